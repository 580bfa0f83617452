{{/* Names, labels and the values every template shares. */}}

{{- define "hookrun.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-hookrun, or <release> when the release name already says hookrun. Kept short
enough for the "-apiserver-metrics" suffix. */}}
{{- define "hookrun.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "hookrun.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "hookrun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hookrun
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "operator"). */}}
{{- define "hookrun.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hookrun.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. */}}
{{- define "hookrun.componentLabels" -}}
{{ include "hookrun.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference: (dict "root" $ "image" .Values.operator.image "name"
"hookrun-operator"). The repository is the image's own, else
<global.imageRegistry>/<name>; by digest when one is set, else by tag (default: the
chart's appVersion). hookrun publishes no images, so with neither the install stops and
says how to push them. */}}
{{- define "hookrun.image" -}}
{{- $registry := (.root.Values.global).imageRegistry | default "" | trim | trimSuffix "/" }}
{{- $repository := .image.repository | default "" | trim }}
{{- if not $repository }}
{{- if not $registry }}
{{- fail (printf "\n\nno image registry for %s: hookrun publishes no images, so push them to a registry your cluster can pull from first. One command builds, pushes and installs by digest:\n\n  make deploy REGISTRY=registry.example.com/team PUBLIC_URL=https://hooks.example.com\n\nor push target/images/*.tar (make images) yourself and --set global.imageRegistry=registry.example.com/team (or set operator.image.repository, apiserver.image.repository and harness.image.repository).\nSee charts/hookrun/README.md, \"Images\"." .name) }}
{{- end }}
{{- $repository = printf "%s/%s" $registry .name }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repository .image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .root.Chart.AppVersion .image.tag | toString) }}
{{- end }}
{{- end }}

{{- define "hookrun.serviceAccountName" -}}
{{- $values := index .root.Values .component }}
{{- if $values.serviceAccount.create }}
{{- default (printf "%s-%s" (include "hookrun.fullname" .root) .component) $values.serviceAccount.name }}
{{- else }}
{{- required (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false" .component .component) $values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* publicURL, checked: every webhook URL starts with it. */}}
{{- define "hookrun.publicURL" -}}
{{- $url := .Values.publicURL | default "" | trim }}
{{- if not $url }}
{{- fail "\n\npublicURL is required: the public base of every webhook URL, as callers reach the hookrun apiserver (e.g. --set publicURL=https://hooks.example.com).\nSee charts/hookrun/README.md." }}
{{- end }}
{{- if not (regexMatch "^https?://[^/?#]+(/[^?#]*)?$" $url) }}
{{- fail (printf "\n\npublicURL %q must be an absolute http:// or https:// URL without a query or fragment (e.g. https://hooks.example.com)." $url) }}
{{- end }}
{{- $url }}
{{- end }}

{{- define "hookrun.apiserverServiceName" -}}
{{- printf "%s-apiserver" (include "hookrun.fullname" .) }}
{{- end }}

{{- define "hookrun.runnerServiceName" -}}
{{- printf "%s-runner" (include "hookrun.fullname" .) }}
{{- end }}

{{/* The runner API as session pods reach it: the in-cluster runner Service unless set. */}}
{{- define "hookrun.runnerURL" -}}
{{- if .Values.runnerURL }}
{{- .Values.runnerURL }}
{{- else }}
{{- printf "http://%s.%s.svc:%v" (include "hookrun.runnerServiceName" .) .Release.Namespace .Values.apiserver.runnerService.port }}
{{- end }}
{{- end }}

{{/* The namespaces flag value, or nothing for every namespace. */}}
{{- define "hookrun.namespacesFlag" -}}
{{- if .Values.watchNamespaces }}
{{- printf "--namespaces=%s" (join "," .Values.watchNamespaces) }}
{{- end }}
{{- end }}

{{/* Topology spread: (dict "root" $ "component" "apiserver" "constraints" <list or nil>
"default" <list>). A constraint without a labelSelector selects the component's pods. */}}
{{- define "hookrun.topologySpread" -}}
{{- $constraints := .constraints }}
{{- if kindIs "invalid" $constraints }}
{{- $constraints = .default }}
{{- end }}
{{- $out := list }}
{{- range $constraints }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "hookrun.selectorLabels" (dict "root" $.root "component" $.component) | fromYaml)) }}
{{- end }}
{{- $out = append $out $c }}
{{- end }}
{{- if $out }}
topologySpreadConstraints:
  {{- toYaml $out | nindent 2 }}
{{- end }}
{{- end }}

{{/* The scheduling fields both Deployments share:
(dict "root" $ "values" .Values.operator). */}}
{{- define "hookrun.podScheduling" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Liveness and readiness on the admin port. */}}
{{- define "hookrun.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: admin
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: admin
  periodSeconds: 5
  failureThreshold: 2
startupProbe:
  httpGet:
    path: /healthz
    port: admin
  periodSeconds: 2
  failureThreshold: 30
{{- end }}
