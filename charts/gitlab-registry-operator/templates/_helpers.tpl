{{/* Chart name, shortened to the 63 characters a DNS label allows. */}}
{{- define "gitlab-registry-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full resource name: release name + chart name, unless the release name already contains the
chart name (so `helm install gitlab-registry-operator ...` gives `gitlab-registry-operator`).
*/}}
{{- define "gitlab-registry-operator.fullname" -}}
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

{{- define "gitlab-registry-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator Pods; never change them after a release exists. */}}
{{- define "gitlab-registry-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gitlab-registry-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gitlab-registry-operator.labels" -}}
helm.sh/chart: {{ include "gitlab-registry-operator.chart" . }}
{{ include "gitlab-registry-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "gitlab-registry-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gitlab-registry-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gitlab-registry-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "true" when the operator must elect a leader: asked for, or more than one replica. */}}
{{- define "gitlab-registry-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/* Name of the Secret holding the default GitLab token; empty when there is no default token. */}}
{{- define "gitlab-registry-operator.tokenSecretName" -}}
{{- if .Values.gitlab.existingSecret }}
{{- .Values.gitlab.existingSecret }}
{{- else if .Values.gitlab.token }}
{{- printf "%s-gitlab-token" (include "gitlab-registry-operator.fullname" .) }}
{{- end }}
{{- end }}

{{- define "gitlab-registry-operator.tokenSecretKey" -}}
{{- if .Values.gitlab.existingSecret }}
{{- .Values.gitlab.existingSecretKey }}
{{- else }}
{{- "token" }}
{{- end }}
{{- end }}

{{/*
Refuses combinations the schema cannot express: a default connection needs both a URL and a
token source, and the CA comes from one place.
*/}}
{{- define "gitlab-registry-operator.validate" -}}
{{- $tokenSecret := include "gitlab-registry-operator.tokenSecretName" . }}
{{- if and .Values.gitlab.url (not $tokenSecret) }}
{{- fail "gitlab.url is set but no token: set gitlab.existingSecret (recommended) or gitlab.token" }}
{{- end }}
{{- if and $tokenSecret (not .Values.gitlab.url) }}
{{- fail "a GitLab token is given but gitlab.url is empty: set gitlab.url, e.g. https://gitlab.example.com" }}
{{- end }}
{{- if and .Values.gitlab.caConfigMap .Values.gitlab.caSecret }}
{{- fail "set at most one of gitlab.caConfigMap and gitlab.caSecret" }}
{{- end }}
{{- end }}

{{/*
The rules the operator needs on its own kinds, Secrets, Pods and Events (no wildcards), and
nothing more: tests/process.rs runs `run` against a fake apiserver, records every request and
checks these rules allow each one and grant nothing unused.
*/}}
{{- define "gitlab-registry-operator.rules" -}}
# Watched, and patched for the finalizer (a JSON patch); objects are read from the watch.
- apiGroups: ["gitlabregistry.io"]
  resources: ["virtualregistries", "upstreams", "cleanuppolicies"]
  verbs: ["list", "watch", "patch"]
# Status by server-side apply.
- apiGroups: ["gitlabregistry.io"]
  resources: ["virtualregistries/status", "upstreams/status", "cleanuppolicies/status"]
  verbs: ["patch"]
# Tokens and upstream credentials, read from each object's own namespace; never written.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# keepInUse: the images running Pods use are never deleted.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Events (events.k8s.io/v1): created, and patched when the same event repeats.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
The resync interval in seconds (at least 1), from the same duration string passed as --resync
(e.g. 10m, 1h30m, 90s): the alerts measure "3 resyncs" with it.
*/}}
{{- define "gitlab-registry-operator.resyncSeconds" -}}
{{- $unitMs := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 "d" 86400000 }}
{{- $totalMs := 0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d)" .Values.resync -1 }}
{{- $number := regexFind "^[0-9]+" . }}
{{- $unit := trimPrefix $number . }}
{{- $totalMs = add $totalMs (mul (atoi $number) (get $unitMs $unit)) }}
{{- end }}
{{- max 1 (div $totalMs 1000) }}
{{- end }}
