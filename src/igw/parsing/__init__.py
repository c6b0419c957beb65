"""Stage 1: turn a request body into an :class:`~igw.api.types.InferenceRequest`."""
