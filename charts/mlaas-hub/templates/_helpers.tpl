{{- define "mlaas.labels" -}}
app.kubernetes.io/name: mlaas-hub
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
mlaas.io/site: {{ .Values.site | quote }}
{{- end }}

{{- define "mlaas.xcacheName" -}}
{{ printf "xcache-%s" . }}
{{- end }}

{{- /* the pod labels of a selector map, without empty values */ -}}
{{- define "mlaas.matchLabels" -}}
{{- $out := dict }}
{{- range $k, $v := . }}{{ if $v }}{{ $_ := set $out $k $v }}{{ end }}{{ end }}
{{- toYaml $out }}
{{- end }}
