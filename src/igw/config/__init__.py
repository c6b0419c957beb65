"""Side lane: process settings and the pool file (EndpointPickerConfig files come later)."""
