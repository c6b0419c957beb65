"""The ext_proc edge: a sans-io session per stream and the grpc.aio server around it."""
