{{/* Name of every object: <release>-tta-runtime */}}
{{- define "tta-runtime.fullname" -}}
{{ .Release.Name }}-{{ .Chart.Name }}
{{- end -}}

{{- define "tta-runtime.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tta-runtime.labels" -}}
{{ include "tta-runtime.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "tta-runtime.claimName" -}}
{{- if .Values.persistence.existingClaim -}}
{{ .Values.persistence.existingClaim }}
{{- else -}}
{{ include "tta-runtime.fullname" . }}-state
{{- end -}}
{{- end -}}

{{- define "tta-runtime.sharedClaimName" -}}
{{- if .Values.state.persistentVolumeClaim.existingClaim -}}
{{ .Values.state.persistentVolumeClaim.existingClaim }}
{{- else -}}
{{ include "tta-runtime.fullname" . }}-shared-state
{{- end -}}
{{- end -}}

{{/* Router (nginx) and bundled etcd pods get other names, so the server's Services never select them */}}
{{- define "tta-runtime.routerSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-router
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tta-runtime.etcdSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-etcd
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The server pod's spec, shared by the Deployment (one replica) and the StatefulSet (coordination.enabled) */}}
{{- define "tta-runtime.podSpec" -}}
# longer than the server's drain (shutdown delay + grace) plus the checkpoint write
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: tta-runtime
    {{- if .Values.gpu.enabled }}
    image: "{{ .Values.image.repository }}:{{ .Values.image.cudaTag }}"
    {{- else }}
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
    {{- end }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    # appended to the image's ENTRYPOINT: tta serve --host 0.0.0.0 --http-port 8000 --port 8001
    # --metrics-port 8002 --state-dir /var/lib/tta/state
    args:
      - --grace
      - {{ .Values.server.grace | quote }}
      - --shutdown-delay
      - {{ .Values.server.shutdownDelay | quote }}
      - --max-streams
      - {{ .Values.server.maxStreams | quote }}
      - --memory-budget-mb
      - {{ .Values.server.memoryBudgetMb | quote }}
      - --log-level
      - {{ .Values.server.logLevel | quote }}
      {{- if .Values.gpu.enabled }}
      - --device
      - cuda
      {{- else }}
      - --device
      - cpu
      {{- end }}
      {{- if .Values.modelConfig }}
      - --model
      - /etc/tta/model/model.toml
      {{- end }}
      {{- if .Values.server.policy }}
      - --policy
      - {{ .Values.server.policy | quote }}
      {{- end }}
      {{- if .Values.tls.enabled }}
      # TLS from the Secret tls.secretName, mounted at /etc/tta/tls
      - --tls-cert
      - /etc/tta/tls/tls.crt
      - --tls-key
      - /etc/tta/tls/tls.key
      {{- if .Values.tls.clientAuth }}
      - --tls-client-ca
      - /etc/tta/tls/ca.crt
      {{- end }}
      {{- end }}
      {{- if .Values.coordination.enabled }}
      # multi-replica mode: hold streams through etcd leases; the pod name is the replica id and
      # its DNS name under the governing Service the address other replicas reach it at
      - --coordinator
      {{- with .Values.coordination.etcd.endpoints }}
      - "etcd://{{ . }}"
      {{- else }}
      - "etcd://{{ include "tta-runtime.fullname" . }}-etcd.{{ .Release.Namespace }}.svc.{{ .Values.coordination.clusterDomain }}:2379"
      {{- end }}
      - --replica-id
      - $(POD_NAME)
      - --advertise
      - "$(POD_NAME).{{ include "tta-runtime.fullname" . }}-pods.$(POD_NAMESPACE).svc.{{ .Values.coordination.clusterDomain }}:8001"
      - --lease-ttl
      - {{ .Values.coordination.leaseTtl | quote }}
      - --handoff-timeout
      - {{ .Values.coordination.handoffTimeout | quote }}
      - --checkpoint-interval
      - {{ .Values.coordination.checkpointInterval | quote }}
      {{- end }}
      {{- with .Values.server.extraArgs }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- if .Values.coordination.enabled }}
    env:
      # downward API: the StatefulSet pod's stable name (<release>-tta-runtime-N) and namespace
      - name: POD_NAME
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      - name: POD_NAMESPACE
        valueFrom:
          fieldRef:
            fieldPath: metadata.namespace
    {{- end }}
    ports:
      - name: http
        containerPort: 8000
        protocol: TCP
      - name: grpc
        containerPort: 8001
        protocol: TCP
      - name: metrics
        containerPort: 8002
        protocol: TCP
    {{- if .Values.tls.enabled }}
    # Kubernetes' gRPC probes speak no TLS: the image's health check does (runtime.healthcheck), verifying
    # the server against ca.crt{{ if .Values.tls.clientAuth }} and presenting tls.crt as its client certificate{{ end }}
    startupProbe:
      exec:
        command: ["python", "-m", "runtime.healthcheck", "--target", "127.0.0.1:8001", "--timeout", "3",
                  "--tls-ca", "/etc/tta/tls/ca.crt"{{ if .Values.tls.clientAuth }}, "--tls-cert", "/etc/tta/tls/tls.crt", "--tls-key", "/etc/tta/tls/tls.key"{{ end }}{{ with .Values.tls.serverName }}, "--tls-server-name", {{ . | quote }}{{ end }}]
      periodSeconds: {{ .Values.probes.startup.periodSeconds }}
      timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
      failureThreshold: {{ .Values.probes.startup.failureThreshold }}
    livenessProbe:
      exec:
        command: ["python", "-m", "runtime.healthcheck", "--target", "127.0.0.1:8001", "--timeout", "3",
                  "--tls-ca", "/etc/tta/tls/ca.crt"{{ if .Values.tls.clientAuth }}, "--tls-cert", "/etc/tta/tls/tls.crt", "--tls-key", "/etc/tta/tls/tls.key"{{ end }}{{ with .Values.tls.serverName }}, "--tls-server-name", {{ . | quote }}{{ end }}]
      periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
      timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
      failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
    readinessProbe:
      exec:
        command: ["python", "-m", "runtime.healthcheck", "--target", "127.0.0.1:8001", "--timeout", "3",
                  "--service", "inference.GRPCInferenceService",
                  "--tls-ca", "/etc/tta/tls/ca.crt"{{ if .Values.tls.clientAuth }}, "--tls-cert", "/etc/tta/tls/tls.crt", "--tls-key", "/etc/tta/tls/tls.key"{{ end }}{{ with .Values.tls.serverName }}, "--tls-server-name", {{ . | quote }}{{ end }}]
      periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
      timeoutSeconds: {{ .Values.probes.readiness.tlsTimeoutSeconds }}
      failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
    {{- else }}
    startupProbe:
      grpc:
        port: 8001
      periodSeconds: {{ .Values.probes.startup.periodSeconds }}
      timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
      failureThreshold: {{ .Values.probes.startup.failureThreshold }}
    livenessProbe:
      grpc:
        port: 8001
      periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
      timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
      failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
    readinessProbe:
      grpc:
        port: 8001
        service: inference.GRPCInferenceService
      periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
      timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
      failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
    {{- end }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    resources:
      requests:
        {{- toYaml .Values.resources.requests | nindent 8 }}
      limits:
        {{- toYaml .Values.resources.limits | nindent 8 }}
        {{- if .Values.gpu.enabled }}
        {{ .Values.gpu.resourceName }}: {{ .Values.gpu.count }}
        {{- end }}
    volumeMounts:
      - name: state
        mountPath: /var/lib/tta/state
      - name: tmp
        mountPath: /tmp
      {{- if .Values.modelConfig }}
      - name: model-config
        mountPath: /etc/tta/model
        readOnly: true
      {{- end }}
      {{- if .Values.modelVolume }}
      - name: models
        mountPath: /models
        readOnly: true
      {{- end }}
      {{- if .Values.tls.enabled }}
      - name: tls
        mountPath: /etc/tta/tls
        readOnly: true
      {{- end }}
volumes:
  - name: state
    {{- if .Values.coordination.enabled }}
    # one ReadWriteMany volume shared by every replica
    persistentVolumeClaim:
      claimName: {{ include "tta-runtime.sharedClaimName" . }}
    {{- else }}
    {{- if .Values.persistence.enabled }}
    persistentVolumeClaim:
      claimName: {{ include "tta-runtime.claimName" . }}
    {{- else }}
    emptyDir: {}
    {{- end }}
    {{- end }}
  - name: tmp
    emptyDir: {}
  {{- if .Values.modelConfig }}
  - name: model-config
    configMap:
      name: {{ include "tta-runtime.fullname" . }}-model
  {{- end }}
  {{- with .Values.modelVolume }}
  - name: models
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.tls.enabled }}
  - name: tls
    secret:
      secretName: {{ .Values.tls.secretName | quote }}
      defaultMode: 0440
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
