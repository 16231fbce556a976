"""Generated protobuf and gRPC modules of the demo (``generate.sh`` makes them from the
.proto files here; do not edit them by hand)."""
