{{- define "lesionflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lesionflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lesionflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "lesionflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "serving") */}}
{{- define "lesionflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lesionflow.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "lesionflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lesionflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The one image (lesionflow.IMAGE): the KFP components run the same reference. */}}
{{- define "lesionflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "lesionflow.mlflowName" -}}
{{- printf "%s-mlflow" (include "lesionflow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lesionflow.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc:%d" (include "lesionflow.mlflowName" .) .Release.Namespace (int .Values.mlflow.service.port) -}}
{{- else -}}
{{- required "mlflow.trackingUri is required when mlflow.enabled is false" .Values.mlflow.trackingUri -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security shared by every workload. */}}
{{- define "lesionflow.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.runAsUser }}
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "lesionflow.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* S3 access: static keys from a Secret (when one is named) and the endpoint. */}}
{{- define "lesionflow.s3Env" -}}
{{- with .Values.s3.credentials.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.credentials.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.credentials.secretAccessKeyKey }}
{{- end }}
{{- with .Values.s3.endpointUrl }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Serving's /reload token; optional in the Secret, since without it only /reload is off. */}}
{{- define "lesionflow.reloadTokenEnv" -}}
{{- with .Values.secrets.existingSecret }}
- name: LESIONFLOW_RELOAD_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.reloadTokenKey }}
      optional: true
{{- end }}
{{- end -}}

{{/* The pseudonymization key; required: pseudonyms made without it would not match the pipeline's. */}}
{{- define "lesionflow.pseudonymKeyEnv" -}}
{{- with .Values.secrets.existingSecret }}
- name: LESIONFLOW_PSEUDONYM_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.pseudonymKeyKey }}
{{- end }}
{{- end -}}

{{/* What an MLflow client needs: the tracking URI and, if named, basic-auth from a Secret. */}}
{{- define "lesionflow.mlflowClientEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "lesionflow.trackingUri" . | quote }}
{{- with .Values.mlflow.auth.existingSecret }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.mlflow.auth.usernameKey }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.mlflow.auth.passwordKey }}
{{- end }}
{{- end -}}

{{/* lesionflow CLI options every command shares: the image's params.yaml, then the chart's
     overrides, a writable workdir and the cluster's locations. */}}
{{- define "lesionflow.cliArgs" -}}
- --params
- /app/params.yaml
- /etc/lesionflow/params.yaml
- --set
- runtime.workdir=/tmp/lesionflow
- --set
- runtime.mlflow_tracking_uri={{ include "lesionflow.trackingUri" . }}
{{- with .Values.s3.endpointUrl }}
- --set
- runtime.s3_endpoint_url={{ . }}
{{- end }}
{{- end -}}

{{/* /tmp (writable under the read-only root) and the params overrides. */}}
{{- define "lesionflow.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: params
  configMap:
    name: {{ include "lesionflow.fullname" . }}-params
{{- end -}}

{{- define "lesionflow.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: params
  mountPath: /etc/lesionflow
  readOnly: true
{{- end -}}

{{- define "lesionflow.scheduling" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
