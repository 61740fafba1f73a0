{{/*
The prefix of every object's name.
*/}}
{{- define "spool.prefix" -}}
{{- required "namePrefix must not be empty" .Values.namePrefix | trunc 40 | trimSuffix "-" -}}
{{- end }}

{{/*
Labels of every object: the kustomize flavours' part-of label, and Helm's.
Pod templates and selectors carry only the flavours' own labels, so that a
release that adopts an installation made with kustomize does not restart
its pods.
*/}}
{{- define "spool.labels" -}}
app.kubernetes.io/part-of: spool
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/*
The flavour, checked.
*/}}
{{- define "spool.flavour" -}}
{{- $f := .Values.flavour -}}
{{- if not (has $f (list "single-node" "local" "shared")) -}}
{{- fail (printf "flavour must be single-node, local or shared, not %q" $f) -}}
{{- end -}}
{{- $f -}}
{{- end }}

{{/*
The CSI socket's directory on the node.
*/}}
{{- define "spool.socketDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName -}}
{{- end }}

{{/*
spool.image: "repository:tag" of an image value ({repository, tag}), the
tag defaulting to def.
*/}}
{{- define "spool.image" -}}
{{- $img := .image -}}
{{- printf "%s:%s" (required "an image repository is empty" $img.repository) (default .def $img.tag | toString) -}}
{{- end }}

{{/*
The pools of the flavour: {hostDir, pools, shared}.
*/}}
{{- define "spool.pools" -}}
{{- if eq (include "spool.flavour" .) "shared" -}}
{{- dict "hostDir" .Values.sharedPools.hostDir "pools" .Values.sharedPools.pools "shared" true | toJson -}}
{{- else -}}
{{- dict "hostDir" .Values.localPools.hostDir "pools" .Values.localPools.pools "shared" false | toJson -}}
{{- end -}}
{{- end }}

{{/*
spool.poolArgs: the --pool flags of spool for the flavour's pools. Each
pool needs a name and a dir beneath hostDir, the directory the pods mount.
*/}}
{{- define "spool.poolArgs" -}}
{{- $p := include "spool.pools" . | fromJson -}}
{{- $host := trimSuffix "/" (required "the pools' hostDir must be set" $p.hostDir) -}}
{{- if not $p.pools }}{{ fail "at least one pool must be listed" }}{{ end -}}
{{- range $p.pools }}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$" (toString .name)) }}{{ fail (printf "pool name %q: lower-case letters, digits and dashes" (toString .name)) }}{{ end }}
{{- $dir := clean (toString .dir) }}
{{- if or (not (isAbs $dir)) (not (hasPrefix (printf "%s/" $host) $dir)) }}{{ fail (printf "pool %s: dir %q must be an absolute path beneath hostDir %s" .name (toString .dir) $host) }}{{ end }}
- --pool={{ .name }}={{ $dir }}{{ with .capacity }},capacity={{ . }}{{ end }}{{ if $p.shared }},shared{{ with .id }},id={{ . }}{{ end }}{{ end }}
{{- end }}
{{- end }}

{{/*
The arguments every spool container starts with.
*/}}
{{- define "spool.commonArgs" -}}
- --endpoint=unix:///csi/csi.sock
- --node-id=$(NODE_NAME)
{{- if ne .Values.driverName "spool.csi.dev" }}
- --driver-name={{ .Values.driverName }}
{{- end }}
{{- end }}

{{- define "spool.metricsArg" -}}
{{- if .Values.metrics.enabled }}
- --metrics-address=[$(POD_IP)]:{{ .Values.metrics.port }}
{{- end }}
{{- end }}

{{/*
The env of every spool container.
*/}}
{{- define "spool.env" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end }}

{{/*
The ports of every spool container: healthz is served by the
livenessprobe container, but a probe's named port must be one of its own
container's.
*/}}
{{- define "spool.ports" -}}
- name: healthz
  containerPort: 9808
  protocol: TCP
{{- if .Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- end }}

{{/*
spool.nodeSidecar: a sidecar in the node DaemonSet (no leader election),
as root without capabilities (the CSI socket is root's, mode 0600).
dict: root, name, values (its sidecars.* entry), args (extra), env.
*/}}
{{- define "spool.nodeSidecar" -}}
{{- $r := .root -}}
- name: {{ .name }}
  image: {{ include "spool.image" (dict "image" .values.image "def" "") }}
  imagePullPolicy: {{ $r.Values.sidecars.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --v={{ $r.Values.logLevel }}
    - --timeout={{ $r.Values.sidecars.timeout }}
    - --leader-election=false
    {{- range .args }}
    - {{ . }}
    {{- end }}
  {{- with .env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsUser: 0
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: [ALL]
    seccompProfile:
      type: RuntimeDefault
  resources:
    {{- toYaml .values.resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
{{- end }}

{{/*
spool.controllerSidecar: a leader-elected sidecar in the controller
Deployment, with its /healthz/leader-election liveness probe.
dict: root, name, values, args (extra), env, port, portName.
*/}}
{{- define "spool.controllerSidecar" -}}
{{- $r := .root -}}
- name: {{ .name }}
  image: {{ include "spool.image" (dict "image" .values.image "def" "") }}
  imagePullPolicy: {{ $r.Values.sidecars.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --v={{ $r.Values.logLevel }}
    - --timeout={{ $r.Values.sidecars.timeout }}
    - --leader-election=true
    - --leader-election-namespace={{ $r.Release.Namespace }}
    {{- range .args }}
    - {{ . }}
    {{- end }}
    - --http-endpoint=:{{ .port }}
  {{- with .env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: [ALL]
  ports:
    - name: {{ .portName }}
      containerPort: {{ .port }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz/leader-election
      port: {{ .portName }}
    initialDelaySeconds: 10
    periodSeconds: 20
    timeoutSeconds: 10
    failureThreshold: 3
  resources:
    {{- toYaml .values.resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
{{- end }}

{{/*
spool.livenessProbe: the livenessprobe container, serving /healthz on 9808
for spool's probes. dict: root, node (bool).
*/}}
{{- define "spool.livenessProbe" -}}
{{- $r := .root -}}
- name: livenessprobe
  image: {{ include "spool.image" (dict "image" $r.Values.sidecars.livenessProbe.image "def" "") }}
  imagePullPolicy: {{ $r.Values.sidecars.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --http-endpoint=:9808
    - --probe-timeout=4s
    - --v={{ $r.Values.logLevel }}
  securityContext:
    {{- if .node }}
    runAsUser: 0
    {{- end }}
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: [ALL]
    {{- if .node }}
    seccompProfile:
      type: RuntimeDefault
    {{- end }}
  resources:
    {{- toYaml $r.Values.sidecars.livenessProbe.resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
{{- end }}

{{/*
Whether the flavour's controller-serving workload takes the
csi-snapshot-metadata sidecar (checked: not for local).
*/}}
{{- define "spool.snapshotMetadata" -}}
{{- if .Values.snapshotMetadata.enabled -}}
{{- if eq (include "spool.flavour" .) "local" -}}
{{- fail "snapshotMetadata.enabled: changed block tracking is for the single-node and shared flavours (deploy/README.md)" -}}
{{- end -}}
true
{{- end -}}
{{- end }}

{{/*
The csi-snapshot-metadata container and its volume.
*/}}
{{- define "spool.snapshotMetadataContainer" -}}
- name: csi-snapshot-metadata
  image: {{ include "spool.image" (dict "image" .Values.snapshotMetadata.image "def" "") }}
  imagePullPolicy: {{ .Values.sidecars.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --tls-cert=/tls/tls.crt
    - --tls-key=/tls/tls.key
    - --port=50051
    - --http-endpoint=:8091
    - --v={{ .Values.logLevel }}
  ports:
    - name: cbt
      containerPort: 50051
    - name: cbt-health
      containerPort: 8091
  readinessProbe:
    httpGet: {path: /health, port: cbt-health}
    periodSeconds: 10
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
  resources:
    {{- toYaml .Values.snapshotMetadata.resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
    - name: snapshot-metadata-tls
      mountPath: /tls
      readOnly: true
{{- end }}

{{- define "spool.snapshotMetadataVolume" -}}
- name: snapshot-metadata-tls
  secret:
    secretName: {{ .Values.snapshotMetadata.tlsSecret }}
{{- end }}

{{/*
spool.subjects: the subjects of a sidecar's binding: its own
ServiceAccount, then the accounts of the flavour's pods that run that
sidecar (a pod has one ServiceAccount, deploy/README.md). dict: root, sa
(the binding's own account), binding (attacher, attacher-cfg, resizer, ...).
*/}}
{{- define "spool.subjects" -}}
{{- $r := .root -}}
{{- $extra := dict
  "single-node" (dict "attacher" (list "csi-provisioner") "resizer" (list "csi-provisioner") "snapshotter" (list "csi-provisioner"))
  "local" (dict "snapshotter" (list "csi-provisioner") "resizer" (list "csi-attacher") "resizer-cfg" (list "csi-attacher"))
  "shared" (dict "attacher" (list "csi-provisioner") "attacher-cfg" (list "csi-provisioner") "resizer" (list "csi-provisioner") "resizer-cfg" (list "csi-provisioner") "snapshotter" (list "csi-provisioner") "snapshotter-cfg" (list "csi-provisioner"))
-}}
{{- $accounts := prepend (get (get $extra (include "spool.flavour" $r)) .binding | default list) .sa -}}
{{- range $accounts }}
- kind: ServiceAccount
  name: {{ include "spool.prefix" $r }}-{{ . }}
  namespace: {{ $r.Release.Namespace }}
{{- end }}
{{- end }}
