"""Stage 7: tell the proxy where to send the request."""
