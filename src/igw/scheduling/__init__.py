"""Stage 6: pick endpoints with a profile of filters, weighted scorers and a picker."""
