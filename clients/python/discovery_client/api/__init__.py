"""Generated gRPC/protobuf code for the local API (``protos/``). Regenerate with ``make protos``."""
