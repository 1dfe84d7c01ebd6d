#!/usr/bin/env bash
# End to end on kind: build both images, load them into the cluster, install Prometheus and the
# chart, apply the example InferenceDeployment, wait for Ready, and run `amp4ec infer` through
# a port-forward to its entry Service.
#
# Needs Docker, kind, kubectl, helm (v3.8+ or v4) and network access (Prometheus' chart, PyPI,
# the PyTorch CPU index); not run in CI (no Docker engine and no network there). CI checks the
# same chart, manifests and Dockerfiles offline (tests/deploy).
#
# Usage: hack/e2e-kind.sh [CLUSTER_NAME]    (default: amp4ec; created by hack/kind-up.sh if absent)
#   KEEP=1   leave the release and the example running afterwards

set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
name=${1:-amp4ec}
ctx="kind-$name"
tag="e2e-$(git rev-parse --short HEAD 2>/dev/null || echo local)"
ns=amp4ec-system
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: $tool is required" >&2; exit 1; }
done

step() { printf '\n== %s\n' "$*"; }

kind get clusters 2>/dev/null | grep -qx "$name" || hack/kind-up.sh "$name"
values="out/kind-$name-values.yaml"
[ -f "$values" ] || { echo "e2e-kind: $values missing: run hack/kind-up.sh $name" >&2; exit 1; }

step "build images (this machine's architecture; see docker/*.Dockerfile for multi-arch)"
docker build -f docker/operator.Dockerfile -t "amp4ec/operator:$tag" .
docker build -f docker/node-agent.Dockerfile -t "amp4ec/node-agent:$tag" .
kind load docker-image --name "$name" "amp4ec/operator:$tag" "amp4ec/node-agent:$tag"

step "Prometheus (kube-prometheus-stack: Prometheus Operator, kube-state-metrics, node-exporter)"
helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null 2>&1 || true
helm repo update prometheus-community >/dev/null
helm upgrade --install kps prometheus-community/kube-prometheus-stack --kube-context "$ctx" \
  --namespace monitoring --create-namespace --wait --timeout 10m \
  --set alertmanager.enabled=false \
  --set grafana.sidecar.dashboards.enabled=true \
  --set grafana.sidecar.dashboards.searchNamespace=ALL \
  --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
  --set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false

step "amp4ec chart"
helm upgrade --install amp4ec charts/amp4ec --kube-context "$ctx" \
  --namespace "$ns" --create-namespace --wait --timeout 10m \
  -f "$values" \
  --set operator.image.repository=amp4ec/operator --set operator.image.tag="$tag" \
  --set operator.image.pullPolicy=Never \
  --set agent.image.repository=amp4ec/node-agent --set agent.image.tag="$tag" \
  --set agent.image.pullPolicy=Never \
  --set metrics.serviceMonitor.enabled=true \
  --set operator.config.CAPACITY_MAX_AGE_S=300
kubectl --context "$ctx" -n "$ns" rollout status deploy/amp4ec-operator --timeout 5m
kubectl --context "$ctx" -n "$ns" rollout status ds/amp4ec-monitor --timeout 10m

cleanup() {
  [ -n "${pf:-}" ] && kill "$pf" 2>/dev/null || true
  if [ -z "${KEEP:-}" ]; then
    kubectl --context "$ctx" delete -f manifests/example-mobilenet-v2.yaml --ignore-not-found --wait=false || true
  fi
}
trap cleanup EXIT

step "example InferenceDeployment (waits for Prometheus to have scraped the monitors)"
kubectl --context "$ctx" apply -f manifests/example-mobilenet-v2.yaml
kubectl --context "$ctx" wait idep/mobilenet-v2 --for=condition=Ready --timeout 15m
kubectl --context "$ctx" get idep mobilenet-v2 -o wide

step "amp4ec infer through the entry Service"
source hack/venv.sh agent
kubectl --context "$ctx" port-forward svc/mobilenet-v2 50051:50051 >/dev/null &
pf=$!
sleep 3
input=$(mktemp --suffix .pt)
python -c "import sys, torch; torch.save(torch.rand(1, 3, 224, 224), sys.argv[1])" "$input"
# Mutual TLS: the client certificate the operator wrote for this deployment (docs/security.md).
tls=$(mktemp -d)
for key in ca.crt tls.crt tls.key; do
  (umask 077; kubectl --context "$ctx" get secret mobilenet-v2-client-tls \
    -o "jsonpath={.data.${key//./\\.}}" | base64 -d >"$tls/$key")
done
amp4ec infer --endpoint localhost:50051 --input "$input" \
  --ca "$tls/ca.crt" --cert "$tls/tls.crt" --key "$tls/tls.key"
rm -rf "$input" "$tls"
echo "e2e-kind: OK"
