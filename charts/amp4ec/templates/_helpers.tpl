{{/* Names and labels shared by every template. */}}

{{- define "amp4ec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name when it already contains the chart name. */}}
{{- define "amp4ec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "amp4ec.operatorName" -}}
{{- printf "%s-operator" (include "amp4ec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "amp4ec.monitorName" -}}
{{- printf "%s-monitor" (include "amp4ec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "amp4ec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "amp4ec.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "amp4ec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: amp4ec
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (operator | monitor): stable across upgrades. */}}
{{- define "amp4ec.selectorLabels" -}}
{{ include "amp4ec.componentLabels" . }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{/* The component part of the selector labels, beside amp4ec.labels (which has the instance). */}}
{{- define "amp4ec.componentLabels" -}}
app.kubernetes.io/name: {{ include "amp4ec.name" .root }}-{{ .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "amp4ec.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "amp4ec.agentImage" -}}
{{- printf "%s:%s" .Values.agent.image.repository (default .Chart.AppVersion .Values.agent.image.tag) }}
{{- end }}

{{/* A map as K=V,K2=V2 (sorted keys), the format of AMP4EC_SHARD_ENV. */}}
{{- define "amp4ec.keyValues" -}}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- $pairs = append $pairs (printf "%s=%v" $k $v) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* Operator settings of shard Pods' hardening (docs/operator.md, "Kubernetes hardening"). */}}
{{- define "amp4ec.hardeningEnv" -}}
{{- $operatorLabels := include "amp4ec.selectorLabels" (dict "root" . "component" "operator") | fromYaml }}
- {name: AMP4EC_NETWORK_POLICY, value: {{ .Values.networkPolicy.shards | quote }}}
- {name: AMP4EC_OPERATOR_NAMESPACE, value: {{ .Release.Namespace | quote }}}
- {name: AMP4EC_OPERATOR_POD_LABELS, value: {{ include "amp4ec.keyValues" $operatorLabels | quote }}}
{{- if include "amp4ec.modelCache" . }}
{{- $monitorLabels := include "amp4ec.selectorLabels" (dict "root" . "component" "monitor") | fromYaml }}
# Storage initializers ask their node's monitor first (the node-local Service of its cache port).
- {name: AMP4EC_MODEL_CACHE_ADDRESS, value: {{ printf "%s-cache.%s.svc:%v" (include "amp4ec.monitorName" .) .Release.Namespace .Values.monitor.modelCache.port | quote }}}
- {name: AMP4EC_MONITOR_POD_LABELS, value: {{ include "amp4ec.keyValues" $monitorLabels | quote }}}
{{- end }}
- {name: AMP4EC_PROMETHEUS_NAMESPACE_LABELS, value: {{ include "amp4ec.keyValues" .Values.networkPolicy.prometheus.namespaceSelector | quote }}}
- {name: AMP4EC_PROMETHEUS_POD_LABELS, value: {{ include "amp4ec.keyValues" .Values.networkPolicy.prometheus.podSelector | quote }}}
{{- with .Values.operator.allowedFactoryModules }}
- {name: AMP4EC_ALLOWED_FACTORY_MODULES, value: {{ join "," . | quote }}}
{{- end }}
{{- with .Values.operator.storageAllowedNetworks }}
- {name: AMP4EC_STORAGE_ALLOWED_NETWORKS, value: {{ join "," . | quote }}}
{{- end }}
{{- with .Values.shards.tolerations }}
- {name: AMP4EC_SHARD_TOLERATIONS, value: {{ toJson . | quote }}}
{{- end }}
{{- with .Values.shards.nodeSelector }}
- {name: AMP4EC_SHARD_NODE_SELECTOR, value: {{ include "amp4ec.keyValues" . | quote }}}
{{- end }}
{{- with .Values.shards.imagePullSecrets }}
{{- $names := list }}
{{- range . }}{{ $names = append $names .name }}{{ end }}
- {name: AMP4EC_SHARD_IMAGE_PULL_SECRETS, value: {{ join "," $names | quote }}}
{{- end }}
{{- with .Values.shards.priorityClassName }}
- {name: AMP4EC_SHARD_PRIORITY_CLASS_NAME, value: {{ . | quote }}}
{{- end }}
{{- end }}

{{/* A NetworkPolicy peer: Prometheus's namespace (and Pods, when podSelector is set). */}}
{{- define "amp4ec.prometheusPeer" -}}
- namespaceSelector:
    matchLabels:
      {{- toYaml .Values.networkPolicy.prometheus.namespaceSelector | nindent 6 }}
  {{- with .Values.networkPolicy.prometheus.podSelector }}
  podSelector:
    matchLabels:
      {{- toYaml . | nindent 6 }}
  {{- end }}
{{- end }}

{{/* "true" when cert-manager signs the leaves (tls.issuer.kind: cert-manager), else "". */}}
{{- define "amp4ec.certManager" -}}
{{- if and .Values.tls.enabled (eq .Values.tls.issuer.kind "cert-manager") }}true{{ end }}
{{- end }}

{{/* The issuer as AMP4EC_CERT_ISSUER reads it: <Kind>/<name>, or <Kind>.<group>/<name> outside cert-manager.io. */}}
{{- define "amp4ec.certIssuer" -}}
{{- $ref := .Values.tls.issuer.ref }}
{{- $name := required "tls.issuer.ref.name is required when tls.issuer.kind is cert-manager" $ref.name }}
{{- if eq $ref.group "cert-manager.io" }}
{{- printf "%s/%s" $ref.kind $name }}
{{- else }}
{{- printf "%s.%s/%s" $ref.kind $ref.group $name }}
{{- end }}
{{- end }}

{{/* "true" when the monitors keep the node-wide model cache (it keys entries by the caller's certificate: TLS only). */}}
{{- define "amp4ec.modelCache" -}}
{{- if and .Values.monitor.enabled .Values.monitor.modelCache.enabled .Values.tls.enabled }}true{{ end }}
{{- end }}
