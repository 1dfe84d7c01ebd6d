#!/usr/bin/env bash
# The main job: local mode on MobileNetV2 over three nodes of 1.0/0.6/0.4 CPU.
# Installs what it needs into .venv on first use. Extra flags go to `amp4ec run`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/hack/venv.sh" agent
exec amp4ec run --model mobilenet_v2 --nodes 1.0,0.6,0.4 --requests 200 "$@"
