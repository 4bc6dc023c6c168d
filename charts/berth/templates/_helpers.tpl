{{/* The CSI driver name: fixed, because StorageClasses and existing PVs name it. */}}
{{- define "berth.driverName" -}}berth.csi.dev{{- end }}

{{/* Prefix for every object name: the release name, with "-berth" unless it says berth. */}}
{{- define "berth.fullname" -}}
{{- if contains "berth" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-berth" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{- define "berth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: berth
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: berth
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "node"). */}}
{{- define "berth.selectorLabels" -}}
app.kubernetes.io/name: berth
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "berth.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end }}

{{- define "berth.sidecarImage" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end }}

{{- define "berth.caSecretName" -}}
{{- .Values.agentTLS.existingCASecret | default (printf "%s-ca" .Release.Name) -}}
{{- end }}

{{- define "berth.caConfigMapName" -}}
{{- .Values.agentTLS.existingCAConfigMap | default (printf "%s-agent-ca" .Release.Name) -}}
{{- end }}

{{- define "berth.controllerTLSSecretName" -}}
{{- .Values.agentTLS.existingControllerSecret | default (printf "%s-controller-tls" .Release.Name) -}}
{{- end }}

{{- define "berth.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) (include "berth.driverName" .) -}}
{{- end }}

{{/* Checks that the schema cannot express. */}}
{{- define "berth.validate" -}}
{{- if and .Values.node.pool.device .Values.node.pool.dir -}}
{{- fail "node.pool.device and node.pool.dir are mutually exclusive: set one (or neither, for the pool image of node.pool.size)" -}}
{{- end -}}
{{- $sc := .Values.storageClasses -}}
{{- if and $sc.default.enabled $sc.default.isDefaultClass $sc.replicated.enabled $sc.replicated.isDefaultClass -}}
{{- fail "storageClasses.default.isDefaultClass and storageClasses.replicated.isDefaultClass are both true: a cluster has at most one default StorageClass" -}}
{{- end -}}
{{- $t := .Values.agentTLS -}}
{{- if not (and (eq (empty $t.existingCASecret) (empty $t.existingControllerSecret)) (eq (empty $t.existingCASecret) (empty $t.existingCAConfigMap))) -}}
{{- fail "agentTLS.existingCASecret, agentTLS.existingControllerSecret and agentTLS.existingCAConfigMap go together: the CA, the controller's certificate of it, and the CA certificate for the nodes" -}}
{{- end -}}
{{- /* Only a class forced on conflicts; "auto" leaves it out without the snapshotter. */ -}}
{{- $snapshotClass := eq (toString .Values.volumeSnapshotClass.enabled) "true" -}}
{{- $groupClass := eq (toString .Values.volumeGroupSnapshotClass.enabled) "true" -}}
{{- if and $groupClass (not .Values.sidecars.snapshotter.groupSnapshots) -}}
{{- fail "volumeGroupSnapshotClass.enabled=true needs sidecars.snapshotter.groupSnapshots: true" -}}
{{- end -}}
{{- if and (or $snapshotClass $groupClass) (not .Values.sidecars.snapshotter.enabled) -}}
{{- fail "volumeSnapshotClass / volumeGroupSnapshotClass enabled=true need sidecars.snapshotter.enabled: true" -}}
{{- end -}}
{{- end }}
