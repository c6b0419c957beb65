"""Stage 8: in-flight bookkeeping and request metrics, from pick to the end of the stream."""
