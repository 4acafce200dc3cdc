{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "avatarforcing.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, prefixed with the chart name unless it contains it. */}}
{{- define "avatarforcing.fullname" -}}
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

{{- define "avatarforcing.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels. */}}
{{- define "avatarforcing.labels" -}}
helm.sh/chart: {{ include "avatarforcing.chart" . }}
{{ include "avatarforcing.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: avatarforcing
{{- end }}

{{/* Selector labels of the service's pods. */}}
{{- define "avatarforcing.selectorLabels" -}}
app.kubernetes.io/name: {{ include "avatarforcing.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/* The bundled Redis. */}}
{{- define "avatarforcing.redis.fullname" -}}
{{- printf "%s-redis" (include "avatarforcing.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "avatarforcing.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "avatarforcing.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "avatarforcing.redis.labels" -}}
helm.sh/chart: {{ include "avatarforcing.chart" . }}
{{ include "avatarforcing.redis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.bundled.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: avatarforcing
{{- end }}

{{/* The headless Service's name (per-pod DNS: <pod-ip-dashed>.<this>.<ns>.svc). */}}
{{- define "avatarforcing.headlessName" -}}
{{- printf "%s-headless" (include "avatarforcing.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "avatarforcing.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "avatarforcing.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "avatarforcing.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Redis URL passed as AVATARFORCING_REDIS_URL ("" when there is none). */}}
{{- define "avatarforcing.redisURL" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "redis://%s:6379/0" (include "avatarforcing.redis.fullname" .) }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{- define "avatarforcing.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "avatarforcing.fullname" .)) }}
{{- end }}

{{- define "avatarforcing.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "avatarforcing.fullname" .)) }}
{{- end }}

{{/* Seconds the kubelet waits between the start of the pod's termination and SIGKILL:
     the preStop sleep, the server's grace period (rounded up), and a margin. */}}
{{- define "avatarforcing.terminationGracePeriodSeconds" -}}
{{- add (int .Values.shutdown.preStopSleepSeconds) (int (ceil .Values.server.graceS)) (int .Values.shutdown.marginSeconds) }}
{{- end }}

{{/* The checkpoint passed as AVATARFORCING_CHECKPOINT ("" when none: the embedded default). */}}
{{- define "avatarforcing.checkpoint" -}}
{{- .Values.model.checkpoint | default .Values.server.checkpoint }}
{{- end }}

{{/* The preset passed as AVATARFORCING_PRESET. */}}
{{- define "avatarforcing.preset" -}}
{{- .Values.model.preset | default .Values.server.preset }}
{{- end }}

{{/* The volume source of model.volume (the Pod volume "model"); a claim is attached read-only. */}}
{{- define "avatarforcing.modelVolumeSource" -}}
{{- $source := deepCopy .Values.model.volume }}
{{- if hasKey $source "persistentVolumeClaim" }}
{{- $_ := set $source.persistentVolumeClaim "readOnly" true }}
{{- end }}
{{- toYaml $source }}
{{- end }}

{{/* Cross-field checks that JSON Schema cannot express clearly; each fails with a message. */}}
{{- define "avatarforcing.validate" -}}
{{- if and (not .Values.gpu.enabled) (hasPrefix "cuda" .Values.server.device) }}
{{- fail (printf "server.device=%s needs a GPU: set gpu.enabled=true or server.device=auto|cpu" .Values.server.device) }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.bundled.enabled }}
{{- fail "set either redis.url (an external Redis) or redis.bundled.enabled, not both" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (not (and .Values.tls.cert .Values.tls.key)) }}
{{- fail "tls.enabled needs tls.existingSecret or both tls.cert and tls.key" }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.clientAuth (not .Values.tls.existingSecret) (not .Values.tls.clientCA) }}
{{- fail "tls.clientAuth needs tls.clientCA (or a tls.existingSecret holding ca.crt)" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.tokens) }}
{{- fail "auth.enabled needs auth.existingSecret or at least one entry in auth.tokens" }}
{{- end }}
{{- if and .Values.model.checkpoint .Values.server.checkpoint (ne .Values.model.checkpoint .Values.server.checkpoint) }}
{{- fail (printf "model.checkpoint=%s and server.checkpoint=%s disagree: set model.checkpoint only" .Values.model.checkpoint .Values.server.checkpoint) }}
{{- end }}
{{- if hasKey .Values.model.volume "name" }}
{{- fail "model.volume is a volume source (e.g. persistentVolumeClaim: {claimName: ...}) without a name: the chart names the volume \"model\"" }}
{{- end }}
{{- $mount := trimSuffix "/" .Values.model.mountPath }}
{{- if or (eq $mount "/tmp") (hasPrefix "/tmp/" $mount) (eq $mount "/etc/avatarforcing") (hasPrefix "/etc/avatarforcing/" $mount) }}
{{- fail (printf "model.mountPath=%s collides with the chart's own mounts (/tmp, /etc/avatarforcing): use e.g. /models" .Values.model.mountPath) }}
{{- end }}
{{- $checkpoint := include "avatarforcing.checkpoint" . }}
{{- if and .Values.model.volume $checkpoint (not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.model.mountPath)) $checkpoint)) }}
{{- fail (printf "the checkpoint %s is not under model.mountPath=%s, where model.volume is mounted: set model.checkpoint to %s/<file>" $checkpoint .Values.model.mountPath (trimSuffix "/" .Values.model.mountPath)) }}
{{- end }}
{{- end }}
