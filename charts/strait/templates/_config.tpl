{{/*
The gateway's config file in Kubernetes mode (camelCase keys). Its checksum
is a pod annotation, so a change rolls the gateway pods.
*/}}
{{- define "strait.config" -}}
{{- if gt (int .Values.config.egressPortMin) (int .Values.config.egressPortMax) -}}
{{- fail (printf "config.egressPortMin (%v) must not exceed config.egressPortMax (%v)" .Values.config.egressPortMin .Values.config.egressPortMax) -}}
{{- end -}}
{{- /* `default`: values reused from a release of an older chart lack it. */ -}}
{{- $ipv6 := .Values.ipv6 | default false -}}
{{- if and (not $ipv6) (or (has "IPv6" .Values.service.ipFamilies) (has .Values.service.ipFamilyPolicy (list "PreferDualStack" "RequireDualStack"))) -}}
{{- fail "service.ipFamilies or service.ipFamilyPolicy asks for an IPv6 address for the tunnel Service, where the gateway would not answer (it listens on IPv4 only): set ipv6=true" -}}
{{- end -}}
{{- if and (eq .Values.service.ipFamilyPolicy "SingleStack") (gt (len .Values.service.ipFamilies) 1) -}}
{{- fail "service.ipFamilyPolicy SingleStack takes one of service.ipFamilies, not two" -}}
{{- end -}}
{{- $any := ternary "[::]" "0.0.0.0" $ipv6 -}}
cluster: {{ include "strait.cluster" . }}
identity:
  trustAnchors: /var/run/strait/issuer/ca.crt
  issuerCert: /var/run/strait/issuer/tls.crt
  issuerKey: /var/run/strait/issuer/tls.key
listen:
  tunnel: "{{ $any }}:4143"
  admin: "{{ $any }}:4191"
  dns: "{{ $any }}:5353"
  destination: "{{ $any }}:8086"
  identity: "{{ $any }}:8080"
source:
  kubernetes:
    namespace: {{ .Release.Namespace }}
    exportLabel: {{ .Values.config.exportLabel }}
    gatewaySelector: {{ include "strait.gatewaySelector" . }}
    egressPortMin: {{ int .Values.config.egressPortMin }}
    egressPortMax: {{ int .Values.config.egressPortMax }}
    leaseName: {{ .Values.config.leaseName }}
    {{- if $ipv6 }}
    egressAddress: "::"
    {{- end }}
imports:
  gracePeriodSeconds: {{ int .Values.config.gracePeriodSeconds }}
  dnsTtlSeconds: {{ int .Values.config.dnsTtlSeconds }}
maxConnections: {{ int (.Values.config.maxConnections | default 20000) }}
{{- if .Values.injector.enabled }}
injector:
  listen: "{{ $any }}:8443"
  certFile: /var/run/strait/injector/tls.crt
  keyFile: /var/run/strait/injector/tls.key
  image: {{ printf "%s:%s" .Values.injector.proxyImage.repository (default .Chart.AppVersion .Values.injector.proxyImage.tag) }}
  ipv6: {{ .Values.injector.ipv6 }}
{{- end }}
{{- end -}}
