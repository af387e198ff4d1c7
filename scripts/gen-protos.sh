#!/usr/bin/env bash
# Regenerate the Python modules of the vendored Triton / KServe v2 protos in service/protos/.
# The generated *_pb2.py files are committed, so serving needs only the protobuf runtime; run this
# after updating a .proto (needs grpcio-tools, in the [dev] extra).
set -euo pipefail
cd "$(dirname "$0")/../service/protos"
PYTHON="${PYTHON:-python}"
"$PYTHON" -m grpc_tools.protoc -I. --python_out=. model_config.proto
echo "regenerated service/protos/model_config_pb2.py"
