#!/usr/bin/env bash
# Bring up a multi-node kind cluster whose workers look like edge nodes: labelled for amp4ec,
# each with its own CPU and memory limit (an edge profile).
#
# Needs Docker and kind (and kubectl); not run in CI (no Docker engine there).
#
# Usage: hack/kind-up.sh [CLUSTER_NAME]              (default: amp4ec)
#   AMP4EC_PROFILES="1.0:1g 0.6:768m 0.4:768m"        one worker per entry, cpus:memory
#   KIND_NODE_IMAGE=kindest/node:v1.31.0               optional
#
# What "limited like an edge profile" means here: kind cannot give a node less than the host,
# so each worker's container gets `docker update --cpus/--memory` (the kernel enforces it for
# everything on that node), and the profile is written to out/kind-<name>-values.yaml as
# monitor.capacityOverrides, because the monitor measures through its own cgroup and would
# otherwise report the host (see charts/amp4ec/README.md, "Edge profiles").

set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=${1:-amp4ec}
read -r -a profiles <<<"${AMP4EC_PROFILES:-1.0:1g 0.6:768m 0.4:768m}"
for tool in docker kind kubectl numfmt; do
  command -v "$tool" >/dev/null || { echo "kind-up: $tool is required" >&2; exit 1; }
done

config=$(mktemp)
trap 'rm -f "$config"' EXIT
{
  echo "kind: Cluster"
  echo "apiVersion: kind.x-k8s.io/v1alpha4"
  echo "nodes:"
  echo "  - role: control-plane"
  for i in "${!profiles[@]}"; do
    echo "  - role: worker"
    echo "    labels: {amp4ec.io/edge: \"true\", amp4ec.io/profile: \"${profiles[$i]/:/-}\"}"
  done
} >"$config"

if kind get clusters 2>/dev/null | grep -qx "$name"; then
  echo "kind-up: cluster $name exists; reusing it" >&2
else
  kind create cluster --name "$name" --config "$config" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 120s
fi

# kind names worker containers (and their Kubernetes nodes) <name>-worker, <name>-worker2, ...
mkdir -p "$root/out"
values="$root/out/kind-$name-values.yaml"
{
  echo "# Written by hack/kind-up.sh: the edge profiles of kind cluster $name."
  echo "monitor:"
  echo "  capacityOverrides:"
} >"$values"
for i in "${!profiles[@]}"; do
  node="$name-worker$([ "$i" -gt 0 ] && echo $((i + 1)))"
  cpus=${profiles[$i]%%:*}
  mem=${profiles[$i]#*:}
  docker update --cpus "$cpus" --memory "$mem" --memory-swap "$mem" "$node" >/dev/null
  bytes=$(numfmt --from=iec "${mem^^}")
  # A shard may use what is left after the kubelet and the monitor: about three quarters.
  echo "    $node: {cpu_limit: $cpus, memory_available_bytes: $((bytes * 3 / 4))}" >>"$values"
  echo "kind-up: $node: $cpus CPU, $mem"
done

kubectl --context "kind-$name" get nodes -L amp4ec.io/edge,amp4ec.io/profile
echo "kind-up: edge profiles for the chart in $values (hack/e2e-kind.sh passes them to helm)"
