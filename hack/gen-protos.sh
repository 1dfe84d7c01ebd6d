#!/usr/bin/env bash
# Regenerate amp4ec/wire/{v1,oip}/*_pb2*.py from protos/ (amp4ec's contract and the Open
# Inference Protocol the front door serves).
# The output is committed; tests/wire/test_generated_up_to_date.py fails when it drifts.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
py=${PYTHON:-python}
cd "$root"
mkdir -p "$out/amp4ec/wire/v1" "$out/amp4ec/wire/oip"
"$py" -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/amp4ec/wire/v1/*.proto
"$py" -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/amp4ec/wire/oip/*.proto
