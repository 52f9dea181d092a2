{{/* The namespaces whose pods run the sidecar: .Values.namespaces, or the release's. */}}
{{- define "discovery-sidecar.namespaces" -}}
{{- $namespaces := .Values.namespaces | default (list .Release.Namespace) -}}
{{- toJson $namespaces -}}
{{- end -}}

{{- define "discovery-sidecar.labels" -}}
app.kubernetes.io/name: discovery-sidecar
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "discovery-sidecar.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/*
The documents of a file under files/ (a copy of a manifest under manifests/, kept identical by a test),
as a list of objects, each with the chart's labels added.
*/}}
{{- define "discovery-sidecar.documents" -}}
{{- $root := index . 0 -}}
{{- $objects := list -}}
{{- range $text := regexSplit "(?m)^---$" ($root.Files.Get (index . 1)) -1 -}}
{{- $object := fromYaml $text -}}
{{- if $object -}}
{{- $labels := merge (include "discovery-sidecar.labels" $root | fromYaml) ($object.metadata.labels | default dict) -}}
{{- $_ := set $object.metadata "labels" $labels -}}
{{- $objects = append $objects $object -}}
{{- end -}}
{{- end -}}
{{- toJson $objects -}}
{{- end -}}
