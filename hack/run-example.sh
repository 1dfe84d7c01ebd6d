#!/usr/bin/env bash
# The main job: local mode on ResNet-50 over three nodes of 0.6/0.4/0.4 CPU and 352 MiB each.
# Less CPU than the machine's 2 cores (the load generator keeps some), and no node can hold
# the model: each offers its shard 352 MiB less its agent's 288 MiB, 64 MiB, where ResNet-50's
# parameters take 97.5 MiB. So the planner splits it, and the output shows the split.
# Installs what it needs into .venv on first use. Extra flags go to `amp4ec run`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/hack/venv.sh" agent
exec amp4ec run --model resnet50 --nodes 0.6:352M,0.4:352M,0.4:352M --requests 50 "$@"
