{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "strait.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
This cluster's name; rendering stops if it is missing (values.schema.json
also checks it is an RFC 1123 label).
*/}}
{{- define "strait.cluster" -}}
{{- required "cluster is required: --set cluster=<this cluster's name>, an RFC 1123 label such as west" .Values.cluster -}}
{{- end -}}

{{/*
Labels of every object of the release.
*/}}
{{- define "strait.commonLabels" -}}
helm.sh/chart: {{ include "strait.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: strait
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
Labels of the gateway's objects.
*/}}
{{- define "strait.labels" -}}
app.kubernetes.io/name: strait-gateway
{{ include "strait.commonLabels" . }}
{{- end -}}

{{/*
Selector labels of the gateway pods (the config's gatewaySelector matches
these too).
*/}}
{{- define "strait.selectorLabels" -}}
app.kubernetes.io/name: strait-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The gatewaySelector of the config file: a label selector string.
*/}}
{{- define "strait.gatewaySelector" -}}
app.kubernetes.io/name=strait-gateway,app.kubernetes.io/instance={{ .Release.Name }}
{{- end -}}

{{/*
Gateway image.
*/}}
{{- define "strait.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Name of the issuer Secret: the user's own, or the one this chart renders.
Rendering stops with a clear message when neither inline PEMs nor an
existing Secret are given.
*/}}
{{- define "strait.issuerSecretName" -}}
{{- if .Values.issuer.existingSecret -}}
{{- .Values.issuer.existingSecret -}}
{{- else -}}
{{- if not (and .Values.issuer.cert .Values.issuer.key .Values.issuer.ca) -}}
{{- fail "the gateway needs an issuer: set issuer.cert, issuer.key and issuer.ca (PEM, e.g. --set-file issuer.cert=west-issuer.pem --set-file issuer.key=west-issuer.key --set-file issuer.ca=root.pem, made with `strait certs root` and `strait certs issuer --cluster <cluster>`), or issuer.existingSecret (a Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if not (contains "-----BEGIN CERTIFICATE-----" .Values.issuer.cert) -}}
{{- fail "issuer.cert is not a PEM certificate (expected -----BEGIN CERTIFICATE-----; pass the file with --set-file issuer.cert=<cluster>-issuer.pem)" -}}
{{- end -}}
{{- if not (contains "-----BEGIN CERTIFICATE-----" .Values.issuer.ca) -}}
{{- fail "issuer.ca is not a PEM certificate (expected -----BEGIN CERTIFICATE-----; pass the trust anchor with --set-file issuer.ca=root.pem)" -}}
{{- end -}}
{{- if not (regexMatch "-----BEGIN ([A-Z]+ )?PRIVATE KEY-----" .Values.issuer.key) -}}
{{- fail "issuer.key is not a PEM private key (pass the file with --set-file issuer.key=<cluster>-issuer.key)" -}}
{{- end -}}
strait-issuer
{{- end -}}
{{- end -}}

{{/*
The restrictive container securityContext shared by the gateway and the
test pod.
*/}}
{{- define "strait.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
The pod securityContext shared by the gateway and the test pod.
*/}}
{{- define "strait.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Prometheus scrape annotations (on strait-admin and the gateway pods).
*/}}
{{- define "strait.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: "4191"
prometheus.io/path: /metrics
{{- end -}}

{{/*
Name of the injector's TLS Secret: the user's own, or the one this chart
renders.
*/}}
{{- define "strait.injectorSecretName" -}}
{{- default "strait-injector-tls" .Values.injector.tls.existingSecret -}}
{{- end -}}
