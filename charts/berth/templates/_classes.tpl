{{- /*
Whether each class is rendered. A value of "auto" follows the cluster: the class is rendered
when the API server serves its kind (.Capabilities.APIVersions, which `helm install` and
`helm upgrade` fill from discovery and `helm template` from --api-versions), so a plain
`helm install` on a cluster with the snapshot CRDs gets a usable VolumeSnapshotClass and one
without them gets no object it would refuse. true and false force the choice.
Each template returns "true" or nothing.
*/ -}}

{{- define "berth.volumeSnapshotClassEnabled" -}}
{{- $enabled := .Values.volumeSnapshotClass.enabled -}}
{{- if eq (toString $enabled) "auto" -}}
{{- /* A class without the snapshotter sidecar would accept VolumeSnapshots nothing serves. */ -}}
{{- if and .Values.sidecars.snapshotter.enabled (.Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1/VolumeSnapshotClass") -}}
true
{{- end -}}
{{- else if $enabled -}}
true
{{- end -}}
{{- end -}}

{{- define "berth.volumeGroupSnapshotClassEnabled" -}}
{{- $class := .Values.volumeGroupSnapshotClass -}}
{{- if eq (toString $class.enabled) "auto" -}}
{{- $snapshotter := .Values.sidecars.snapshotter -}}
{{- if and $snapshotter.enabled $snapshotter.groupSnapshots (.Capabilities.APIVersions.Has (printf "%s/VolumeGroupSnapshotClass" $class.apiVersion)) -}}
true
{{- end -}}
{{- else if $class.enabled -}}
true
{{- end -}}
{{- end -}}

{{- /*
The apiVersion VolumeAttributesClasses are rendered with, or nothing when they are not
rendered. storage.k8s.io/v1 is served from Kubernetes 1.34; 1.31-1.33 serve v1beta1 only with
the VolumeAttributesClass feature gate and the storage.k8s.io/v1beta1 API enabled. Forced on
with neither seen (`helm template` without --api-versions), the Kubernetes version decides.
*/ -}}
{{- define "berth.volumeAttributesClassAPIVersion" -}}
{{- $enabled := .Values.volumeAttributesClasses.enabled -}}
{{- $has := .Capabilities.APIVersions -}}
{{- if $enabled -}}
{{- if $has.Has "storage.k8s.io/v1/VolumeAttributesClass" -}}
storage.k8s.io/v1
{{- else if $has.Has "storage.k8s.io/v1beta1/VolumeAttributesClass" -}}
storage.k8s.io/v1beta1
{{- else if ne (toString $enabled) "auto" -}}
{{- if semverCompare ">=1.34.0-0" .Capabilities.KubeVersion.Version -}}
storage.k8s.io/v1
{{- else -}}
storage.k8s.io/v1beta1
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
