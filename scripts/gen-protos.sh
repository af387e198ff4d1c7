#!/usr/bin/env bash
# Regenerate the Python modules of the vendored Triton / KServe v2 protos in service/protos/.
# The generated *_pb2.py / *_pb2_grpc.py files are committed, so serving needs only the protobuf and
# grpcio runtimes; run this after updating a .proto (needs grpcio-tools, in the [dev] extra).
set -euo pipefail
cd "$(dirname "$0")/../service/protos"
PYTHON="${PYTHON:-python}"
"$PYTHON" -m grpc_tools.protoc -I. --python_out=. model_config.proto
"$PYTHON" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. grpc_service.proto
# protoc writes the imports as top-level modules ("import model_config_pb2"); make them package-relative.
sed -i -E 's/^import (model_config_pb2|grpc_service_pb2) as /from service.protos import \1 as /' \
    grpc_service_pb2.py grpc_service_pb2_grpc.py
echo "regenerated service/protos/{model_config,grpc_service}_pb2*.py"
