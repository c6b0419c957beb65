"""The director: the only place that sequences the stages of the request path."""
