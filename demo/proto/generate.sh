#!/bin/sh
# Regenerates the checked-in *_pb2.py, *_pb2.pyi and *_pb2_grpc.py from the .proto files
# beside this script. Needs grpcio-tools (a dev dependency): PYTHON=.venv/bin/python.
# The protos are compiled under their import path shoal/demo/proto/, so the generated
# modules import each other as `shoal.demo.proto.x_pb2` and work inside the package;
# the proto package (emojivoto.v1) and so the gRPC paths are unchanged by that.
set -eu
cd "$(dirname "$0")/../.."      # the repository root, where shoal/demo -> demo
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m grpc_tools.protoc -I . \
    --python_out=. --pyi_out=. --grpc_python_out=. \
    shoal/demo/proto/emoji.proto shoal/demo/proto/voting.proto
echo "generated: $(ls demo/proto/*_pb2*)"
