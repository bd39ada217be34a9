{{/* ---- names and labels -------------------------------------------------------- */}}

{{- define "x402.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "x402.fullname" -}}
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

{{- define "x402.redisName" -}}
{{- printf "%s-redis" (include "x402.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "x402.selectorLabels" -}}
app.kubernetes.io/name: {{ include "x402.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The gateway pods (service + Envoy + sidecar); the in-chart Redis is "redis". */}}
{{- define "x402.gatewaySelectorLabels" -}}
{{ include "x402.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "x402.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "x402.podLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* Pod templates' labels: none that changes with the chart or app version, so a chart
     bump does not restart a pod (the ledger's above all) by its labels alone. */}}
{{- define "x402.podLabels" -}}
{{ include "x402.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "x402.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "x402.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "x402.image" -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag) }}
{{- end }}

{{- define "x402.sidecarImage" -}}
{{- include "x402.image" (dict "image" .Values.sidecar.image "default" .Chart.AppVersion) }}
{{- end }}

{{/* Paths inside the pod: the config and secret volumes mount here. */}}
{{- define "x402.configPath" -}}/etc/x402/config/x402.yaml{{- end }}
{{- define "x402.secretsDir" -}}/etc/x402/secrets{{- end }}
{{- define "x402.adminSecretsDir" -}}/etc/x402/admin{{- end }}
{{- define "x402.adminTlsDir" -}}/etc/x402/admin-tls{{- end }}
{{- define "x402.facilitatorsDir" -}}/etc/x402/facilitators{{- end }}
{{- define "x402.envoyConfigPath" -}}/etc/envoy/envoy.yaml{{- end }}

{{/* ---- values checks the schema cannot express (fail closed, name the key) -------- */}}

{{- define "x402.validate" -}}
{{- $v := .Values }}
{{- if not (hasKey $v.assets $v.defaultAsset) }}
{{- fail (printf "defaultAsset: %q is not in assets (%s)" $v.defaultAsset (keys $v.assets | sortAlpha | join ", ")) }}
{{- end }}
{{- range $name, $route := $v.routes }}
{{- $asset := default $v.defaultAsset $route.asset }}
{{- if not (hasKey $v.assets $asset) }}
{{- fail (printf "routes.%s.asset: unknown asset %q (assets: %s)" $name $asset (keys $v.assets | sortAlpha | join ", ")) }}
{{- end }}
{{- $decimals := int (index $v.assets $asset) }}
{{- if hasKey $route "price" }}
{{- $parts := splitList "." $route.price }}
{{- $fraction := "" }}
{{- if gt (len $parts) 1 }}{{ $fraction = index $parts 1 }}{{ end }}
{{- if gt (len $fraction) $decimals }}
{{- fail (printf "routes.%s.price: %q has more than %d decimals, the most %s allows" $name $route.price $decimals $asset) }}
{{- end }}
{{- /* Atomic units must stay below the ledger's maximum balance, 2^53 - 1. */}}
{{- $digits := printf "%s%s%s" (index $parts 0) $fraction (repeat (int (sub $decimals (len $fraction))) "0") }}
{{- $atomic := regexReplaceAll "^0+" $digits "" }}
{{- if or (gt (len $atomic) 16) (and (eq (len $atomic) 16) (gt $atomic "9007199254740991")) }}
{{- fail (printf "routes.%s.price: %q is larger than the ledger's maximum balance" $name $route.price) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* Sidecar worker i listens on grpcPort + i (and, over HTTP or with a held route, on
       authzHttpPort + i). */}}
{{- $ports := list (int $v.envoy.port) (int $v.envoy.adminPort) (int $v.envoy.probePort) (int $v.sidecar.httpPort) (int $v.sidecar.healthPort) }}
{{- if not $v.existingService.name }}{{ $ports = prepend $ports (int $v.app.port) }}{{ end }}
{{- if $v.sidecar.admin.enabled }}{{ $ports = append $ports (int $v.sidecar.admin.port) }}{{ end }}
{{- range $i := until (int $v.sidecar.workers) }}{{ $ports = append $ports (add $v.sidecar.grpcPort $i | int) }}{{ end }}
{{- if include "x402.listensHttp" . }}
{{- range $i := until (int $v.sidecar.workers) }}{{ $ports = append $ports (add $v.sidecar.authzHttpPort $i | int) }}{{ end }}
{{- end }}
{{- if and $v.existingService.name $v.networkPolicy.enabled (not $v.existingService.podSelector) }}
{{- fail "existingService.podSelector: the labels of the service's pods, so a NetworkPolicy lets only the gateway reach them (or networkPolicy.enabled=false if your cluster enforces that otherwise)" }}
{{- end }}
{{- if and $v.existingService.name $v.app.image.repository }}
{{- fail "existingService.name: the gateway fronts an existing Service, so it runs no app container; unset app.image.repository" }}
{{- end }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "ports: app.port, envoy.port, envoy.adminPort, envoy.probePort, sidecar.httpPort, sidecar.healthPort and sidecar.grpcPort..grpcPort+workers-1 (with transport http or a held route, authzHttpPort..authzHttpPort+workers-1 too) share one network namespace and must differ (got %v)" $ports) }}
{{- end }}
{{- range $key := list "grpcPort" "authzHttpPort" }}
{{- $port := index $v.sidecar $key | int }}
{{- if and (or (eq $key "grpcPort") (include "x402.listensHttp" $)) (gt (add $port $v.sidecar.workers | int) 65536) }}
{{- fail (printf "sidecar.%s: %d workers need ports %d..%d" $key (int $v.sidecar.workers) $port (add $port $v.sidecar.workers -1 | int)) }}
{{- end }}
{{- end }}
{{- if and $v.redis.url $v.redis.internal.enabled }}
{{- fail "redis: redis.url points at an existing Redis, so set redis.internal.enabled=false (or unset redis.url to use the in-chart Redis)" }}
{{- end }}
{{- if and (not $v.redis.url) (not $v.redis.internal.enabled) }}
{{- fail "redis: the ledger needs a Redis; set redis.url to an existing one, or redis.internal.enabled=true for the in-chart Redis" }}
{{- end }}
{{- if contains "@" $v.redis.url }}
{{- fail "redis.url: must not carry credentials; put the password in a Secret named by redis.auth.existingSecret" }}
{{- end }}
{{- if and $v.redis.auth.username $v.redis.internal.enabled }}
{{- fail "redis.auth.username: an ACL user of an external Redis; the in-chart Redis has only its password" }}
{{- end }}
{{- if and $v.redis.auth.username (not $v.redis.auth.existingSecret) }}
{{- fail "redis.auth.username: needs redis.auth.existingSecret with the password" }}
{{- end }}
{{- if ge (int $v.redis.timeoutMs) (include "x402.durationMs" $v.envoy.authzTimeout | int) }}
{{- fail (printf "envoy.authzTimeout: %s must be longer than redis.timeoutMs (%dms), so the sidecar answers 503 before Envoy gives up" $v.envoy.authzTimeout (int $v.redis.timeoutMs)) }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling: minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- include "x402.validateOperator" . }}
{{- end }}

{{/* The operator's side: loopback ports, TLS, scraping, the anchor log, the drain. */}}
{{- define "x402.validateOperator" -}}
{{- $v := .Values }}
{{- $admin := $v.sidecar.admin }}
{{- if and $admin.enabled (not (has $admin.bindAddress (list "127.0.0.1" "::1" "localhost"))) (not $admin.tls.existingSecret) }}
{{- fail (printf "sidecar.admin.bindAddress: %s is reachable from the network; set sidecar.admin.tls.existingSecret (the sidecar refuses a plaintext admin API off loopback)" $admin.bindAddress) }}
{{- end }}
{{- if and $v.serviceMonitor.enabled $v.networkPolicy.enabled (not $v.networkPolicy.metricsFrom) }}
{{- fail "networkPolicy.metricsFrom: with serviceMonitor.enabled, name who may scrape the sidecar (e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]); no other pod reaches it" }}
{{- end }}
{{- if and $v.prometheusRule.enabled (not $v.serviceMonitor.enabled) }}
{{- fail "prometheusRule.enabled: its alerts read the metrics serviceMonitor.enabled scrapes; turn that on too" }}
{{- end }}
{{- with $v.sidecar.settlement }}
{{- if and .anchorFile (not .anchorVolume) }}
{{- fail "sidecar.settlement.anchorVolume: the anchor log must outlive the pod; give a volume source, e.g. {persistentVolumeClaim: {claimName: x402-anchors}} (or anchorFile: \"\" for Redis only)" }}
{{- end }}
{{- end }}
{{- $grace := int $v.terminationGracePeriodSeconds }}
{{- $needed := include "x402.gracePeriodSeconds" . | int }}
{{- if and $grace (lt $grace $needed) }}
{{- fail (printf "terminationGracePeriodSeconds: %d is shorter than the drain (%ds: preStop %ds, the sidecar's drain %ds, the upstream's %ds, 5s to exit); set it to 0 (computed) or at least %d" $grace $needed (int $v.sidecar.drain.endpointSeconds) (include "x402.sidecarDrainSeconds" . | int) (int $v.envoy.edge.upstreamTimeoutSeconds) $needed) }}
{{- end }}
{{- end }}

{{/* ---- the drain: every number from the values, summed (docs/kubernetes.md) -------- */}}

{{/* The sidecar's own drain (sidecar/server/supervisor.py drain_seconds): with `exact`,
     the longest answer (a top-up: verify + settle + chain lookup + 4 ledger steps + 2s),
     at least 5 s. */}}
{{- define "x402.sidecarDrainSeconds" -}}
{{- $v := .Values }}
{{- $x := $v.exact }}
{{- if $x.onchain }}
{{- $ms := add (int $x.verifyTimeoutMs) (int $x.settleTimeoutMs) (int $x.chainLookupMs) (mul 4 (int $v.redis.timeoutMs)) 2000 }}
{{- max 5 (div (add $ms 999) 1000) }}
{{- else }}5{{ end }}
{{- end }}

{{/* How long Envoy (and the app) stay up after the pod is told to stop: the sidecar's
     preStop, its drain, then the upstream's answer to a check allowed last. */}}
{{- define "x402.envoyStopSeconds" -}}
{{- add (int .Values.sidecar.drain.endpointSeconds) (include "x402.sidecarDrainSeconds" . | int) (int .Values.envoy.edge.upstreamTimeoutSeconds) }}
{{- end }}

{{- define "x402.gracePeriodSeconds" -}}
{{- add (include "x402.envoyStopSeconds" . | int) 5 }}
{{- end }}

{{/* The x402 container's preStop: Envoy's /ready turns 503 (the endpoint leaves every
     Service) and its listeners drain (Connection: close, GOAWAY); then the endpoint has
     endpointSeconds to go before the sidecar gets SIGTERM. Errors only print: a stop
     must never hang on it. */}}
{{- define "x402.preStopScript" -}}
import sys, time, urllib.request as r
for path in ("/healthcheck/fail", "/drain_listeners?graceful&inboundonly"):
    try:
        r.urlopen(r.Request("http://127.0.0.1:" + sys.argv[1] + path, method="POST"), timeout=2)
    except Exception as exc:
        print("preStop", path, exc)
time.sleep(int(sys.argv[2]))
{{- end }}

{{/* "512Mi" → bytes (Kubernetes quantities: plain, K/M/G/T and Ki/Mi/Gi/Ti). */}}
{{- define "x402.bytes" -}}
{{- $m := regexFind "^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$" (toString .) }}
{{- if not $m }}{{ fail (printf "redis.internal.resources.limits.memory: %v is not a whole quantity like 512Mi" .) }}{{ end }}
{{- $unit := regexFind "[A-Za-z]+$" $m }}
{{- $n := trimSuffix $unit $m | int64 }}
{{- $scale := get (dict "" 1 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776) $unit }}
{{- mul $n $scale }}
{{- end }}

{{/* Redis' maxmemory in bytes: maxmemoryPercent of its memory limit. */}}
{{- define "x402.redisMaxmemory" -}}
{{- $r := .Values.redis.internal }}
{{- $limit := dig "limits" "memory" "" $r.resources }}
{{- if not $limit }}{{ fail "redis.internal.resources.limits.memory: required; maxmemory is set below it" }}{{ end }}
{{- div (mul (include "x402.bytes" $limit | int64) (int $r.maxmemoryPercent)) 100 }}
{{- end }}

{{/* A Duration ("1s", "0.75s") → whole milliseconds, rounded as server/envoy/filters.py _ms does. */}}
{{- define "x402.durationMs" -}}
{{- round (mulf (trimSuffix "s" . | float64) 1000) 0 | int }}
{{- end }}

{{/* ---- routes ------------------------------------------------------------------ */}}

{{/* "true" when a route is charged on success (or metered): a hold, captured at the
     response phase; "" otherwise. */}}
{{- define "x402.hasPhase" -}}
{{- if or (eq (lower (toString (default "" .charge))) "on_success") (hasKey . "unit_price") }}true{{ end }}
{{- end }}

{{/* "true" when a route holds and is not an MCP route: its response phase is the Lua
     filter's call to the sidecar's HTTP listener, whichever the transport
     (server/envoy/phase_call.py); an MCP route's is ext_proc over gRPC. */}}
{{- define "x402.anyHeld" -}}
{{- range $name, $route := .Values.routes }}{{ if and (include "x402.hasPhase" $route) (not (hasKey $route "mcp")) }}true{{ end }}{{ end }}
{{- end }}

{{- define "x402.anyMcp" -}}
{{- range $name, $route := .Values.routes }}{{ if hasKey $route "mcp" }}true{{ end }}{{ end }}
{{- end }}

{{/* "true" when the sidecar's workers listen on authzHttpPort + i: the HTTP transport's
     checks, or a held route's response phase. */}}
{{- define "x402.listensHttp" -}}
{{- if or (eq .Values.sidecar.transport "http") (include "x402.anyHeld" .) }}true{{ end }}
{{- end }}

{{/* Route names in match order, space-separated: exact paths first, then templated
     ones, each group by name. The sidecar's route table looks up in the same order. */}}
{{- define "x402.routeNames" -}}
{{- $exact := list }}
{{- $templated := list }}
{{- range $name := keys .Values.routes | sortAlpha }}
{{- $path := (index $.Values.routes $name).path }}
{{- if or (contains "{" $path) (contains "*" $path) }}
{{- $templated = append $templated $name }}
{{- else }}
{{- $exact = append $exact $name }}
{{- end }}
{{- end }}
{{- concat $exact $templated | join " " }}
{{- end }}

{{/* Envoy safe_regex of a templated path: {param} → [^/]+, the rest escaped like
     Python's re.escape, exactly as sidecar/server/envoy/browser.py renders it. */}}
{{- define "x402.pathRegex" -}}
{{- $segments := list }}
{{- range splitList "/" . }}
{{- if eq . "**" }}
{{- $segments = append $segments "[^/].*" }}
{{- else if or (eq . "*") (regexMatch "^\\{[A-Za-z_][A-Za-z0-9_]*\\}$" .) }}
{{- $segments = append $segments "[^/]+" }}
{{- else }}
{{- $segments = append $segments (regexQuoteMeta . | replace "-" "\\-" | replace "&" "\\&" | replace "~" "\\~" | replace "#" "\\#") }}
{{- end }}
{{- end }}
{{- join "/" $segments }}
{{- end }}

{{/* A concrete path for a pattern, for `helm test`: each wildcard becomes "x402-test". */}}
{{- define "x402.samplePath" -}}
{{- regexReplaceAll "\\{[A-Za-z_][A-Za-z0-9_]*\\}|\\*\\*|\\*" . "x402-test" }}
{{- end }}

{{/* ---- secrets: generated once in the cluster, then reused on every upgrade -------- */}}

{{/* Whether a missing Secret may be generated now: onInstall, only where `lookup` sees
     the cluster (listing the release namespace's Secrets answers a list there, and
     nothing under `helm template`, Argo CD or a client dry run, where a generated secret
     would be new at every render: a new payee key, a new Redis password). Fails with
     the value to set. `key`: the existingSecret value that avoids generating. */}}
{{- define "x402.mayGenerate" -}}
{{- $root := .root }}
{{- if ne $root.Values.secrets.generate "everyRender" }}
{{- if not (hasKey $root "x402ClusterSeen") }}
{{- $_ := set $root "x402ClusterSeen" (not (empty (lookup "v1" "Secret" $root.Release.Namespace ""))) }}
{{- end }}
{{- if not (get $root "x402ClusterSeen") }}
{{- fail (printf "%s: no cluster to look the generated Secret up in (helm template, Argo CD, a dry run), so it would be regenerated at every render; create the Secret and set %s (docs/kubernetes.md, Secrets with GitOps), or secrets.generate=everyRender for a throwaway trial" .key .key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Computed once per render and cached on the root context, so the Secret and the pod's
     checksum annotation see the same bytes. `lookup` finds the live Secret on upgrades. */}}
{{- define "x402.gatewaySecretData" -}}
{{- if not (hasKey $ "x402GatewaySecretData") }}
{{- $name := printf "%s-keys" (include "x402.fullname" .) }}
{{- $live := lookup "v1" "Secret" .Release.Namespace $name }}
{{- $data := dict }}
{{- if and $live $live.data (hasKey $live.data "signing.key") (hasKey $live.data "invoice.secret") }}
{{- $data = dict "signing.key" (index $live.data "signing.key") "invoice.secret" (index $live.data "invoice.secret") }}
{{- else }}
{{- include "x402.mayGenerate" (dict "root" $ "key" "secrets.existingSecret") }}
{{- /* An Ed25519 seed: 32 random bytes as unpadded base64url, as `x402 keygen` writes. */}}
{{- $seed := randBytes 32 | replace "+" "-" | replace "/" "_" | trimSuffix "=" }}
{{- $data = dict "signing.key" ($seed | b64enc) "invoice.secret" (randAlphaNum 48 | b64enc) }}
{{- end }}
{{- $_ := set $ "x402GatewaySecretData" $data }}
{{- end }}
{{- get $ "x402GatewaySecretData" | toJson }}
{{- end }}

{{- define "x402.redisSecretData" -}}
{{- if not (hasKey $ "x402RedisSecretData") }}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "x402.redisName" .) }}
{{- $data := dict }}
{{- if and $live $live.data (hasKey $live.data "redis-password") }}
{{- $data = dict "redis-password" (index $live.data "redis-password") }}
{{- else }}
{{- include "x402.mayGenerate" (dict "root" $ "key" "redis.auth.existingSecret") }}
{{- /* Alphanumeric: it goes into a redis:// URL unescaped. */}}
{{- $data = dict "redis-password" (randAlphaNum 40 | b64enc) }}
{{- end }}
{{- $_ := set $ "x402RedisSecretData" $data }}
{{- end }}
{{- get $ "x402RedisSecretData" | toJson }}
{{- end }}

{{/* The admin API's bearer token: generated once, then reused (as the keys above). */}}
{{- define "x402.adminSecretData" -}}
{{- if not (hasKey $ "x402AdminSecretData") }}
{{- $live := lookup "v1" "Secret" .Release.Namespace (printf "%s-admin" (include "x402.fullname" .)) }}
{{- $data := dict }}
{{- if and $live $live.data (hasKey $live.data "admin.token") }}
{{- $data = dict "admin.token" (index $live.data "admin.token") }}
{{- else }}
{{- include "x402.mayGenerate" (dict "root" $ "key" "sidecar.admin.existingSecret") }}
{{- $data = dict "admin.token" (randAlphaNum 40 | b64enc) }}
{{- end }}
{{- $_ := set $ "x402AdminSecretData" $data }}
{{- end }}
{{- get $ "x402AdminSecretData" | toJson }}
{{- end }}

{{- define "x402.adminSecretName" -}}
{{- default (printf "%s-admin" (include "x402.fullname" .)) .Values.sidecar.admin.existingSecret }}
{{- end }}

{{- define "x402.gatewaySecretName" -}}
{{- default (printf "%s-keys" (include "x402.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{/* The Secret and key of the Redis password, or nothing when Redis has no password. */}}
{{- define "x402.redisPasswordRef" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- dict "name" .Values.redis.auth.existingSecret "key" .Values.redis.auth.secretKey | toJson }}
{{- else if .Values.redis.internal.enabled }}
{{- dict "name" (include "x402.redisName" .) "key" "redis-password" | toJson }}
{{- end }}
{{- end }}

{{/* The ledger URL; $(REDIS_PASSWORD) is expanded by the kubelet from the env var above
     it, so the password lives only in a Secret, never in a ConfigMap. */}}
{{- define "x402.redisUrl" -}}
{{- $url := .Values.redis.url }}
{{- if .Values.redis.internal.enabled }}
{{- $url = printf "redis://%s:%d/0" (include "x402.redisName" .) (int .Values.redis.internal.port) }}
{{- end }}
{{- if include "x402.redisPasswordRef" . }}
{{- $scheme := regexFind "^redis(\\+cluster)?://" $url }}
{{- printf "%s%s:$(REDIS_PASSWORD)@%s" $scheme .Values.redis.auth.username (trimPrefix $scheme $url) }}
{{- else }}
{{- $url }}
{{- end }}
{{- end }}

{{/* ---- the sidecar's config file (no secrets: those are files and env) ------------- */}}

{{- define "x402.sidecarConfig" -}}
{{- $v := .Values }}
{{- $routes := dict }}
{{- range $name, $route := $v.routes }}
{{- $spec := dict "method" (default "*" $route.method) "path" $route.path "asset" (default $v.defaultAsset $route.asset) }}
{{- if hasKey $route "price" }}{{ $_ := set $spec "price" $route.price }}{{ end }}
{{- if $route.description }}{{ $_ := set $spec "description" $route.description }}{{ end }}
{{- range $key := list "charge" "usage_header" "usage_missing" "unit" "unit_price" }}
{{- if hasKey $route $key }}{{ $_ := set $spec $key (index $route $key | toString) }}{{ end }}
{{- end }}
{{- range $key := list "failure_status" "max_units" "min_units" "hold_seconds" }}
{{- if hasKey $route $key }}{{ $_ := set $spec $key (index $route $key | int64) }}{{ end }}
{{- end }}
{{- range $key := list "mcp" "discoverable" "input_schema" "input_example" "output_schema" "output_example" "body_type" "payment_identifier" "paywall" }}
{{- if hasKey $route $key }}{{ $_ := set $spec $key (index $route $key) }}{{ end }}
{{- end }}
{{- $_ := set $routes $name $spec }}
{{- end }}
{{- $assets := dict }}
{{- range $code, $decimals := $v.assets }}{{ $_ := set $assets $code (int $decimals) }}{{ end }}
{{- $config := dict
  "listen_grpc" (printf "127.0.0.1:%d" (int $v.sidecar.grpcPort))
  "listen_http" (printf "%s:%d" (ternary "0.0.0.0" "127.0.0.1" $v.serviceMonitor.enabled) (int $v.sidecar.httpPort))
  "listen_health" (printf "0.0.0.0:%d" (int $v.sidecar.healthPort))
  "side_port_max_connections" (int $v.sidecar.maxSideConnections)
  "transport" $v.sidecar.transport
  "listen_authz_http" (printf "127.0.0.1:%d" (int $v.sidecar.authzHttpPort))
  "redis_timeout_ms" (int $v.redis.timeoutMs)
  "signing_key_file" (printf "%s/signing.key" (include "x402.secretsDir" .))
  "invoice_secret_file" (printf "%s/invoice.secret" (include "x402.secretsDir" .))
  "log_level" $v.sidecar.logLevel
  "network" $v.sidecar.network
  "public_url" $v.sidecar.publicUrl
  "invoice_ttl_seconds" (int $v.sidecar.invoiceTtlSeconds)
  "max_direct_ttl_seconds" (int $v.sidecar.maxDirectTtlSeconds)
  "max_proof_bytes" (int $v.sidecar.maxProofBytes)
  "rate_limit_payer_per_second" (int $v.sidecar.rateLimits.payerPerSecond)
  "rate_limit_payer_burst" (int $v.sidecar.rateLimits.payerBurst)
  "rate_limit_ip_per_second" (int $v.sidecar.rateLimits.ipPerSecond)
  "rate_limit_ip_burst" (int $v.sidecar.rateLimits.ipBurst)
  "hold_sweep_seconds" (int $v.sidecar.holdSweepSeconds)
  "redelivery_limit" (int $v.sidecar.retries.redeliveryLimit)
  "replay_body_max_bytes" (int $v.sidecar.retries.replayBodyMaxBytes)
  "replay_per_payer" (int $v.sidecar.retries.replayPerPayer)
  "durability" (dict
    "money_in" $v.sidecar.durability.moneyIn
    "replicas" (int $v.sidecar.durability.replicas)
    "timeout_ms" (int $v.sidecar.durability.timeoutMs)
    "reconcile_interval_seconds" (int $v.sidecar.durability.reconcileIntervalSeconds)
    "reconcile_blocks" (int $v.sidecar.durability.reconcileBlocks))
  "settle_interval_seconds" (int $v.sidecar.settlement.intervalSeconds)
  "settle_batch_size" (int $v.sidecar.settlement.batchSize)
  "settle_max_age_seconds" (int $v.sidecar.settlement.maxAgeSeconds)
  "settle_lease_seconds" (int $v.sidecar.settlement.leaseSeconds)
  "anchor_file" $v.sidecar.settlement.anchorFile
  "workers" (int $v.sidecar.workers)
  "default_asset" $v.defaultAsset
  "assets" $assets
  "routes" $routes
}}
{{- range $i, $_key := $v.secrets.previousSigningKeyKeys }}
{{- $_ := set $config "previous_signing_key_files" (append ($config.previous_signing_key_files | default list) (printf "%s/previous-%d.key" (include "x402.secretsDir" $) $i)) }}
{{- end }}
{{- if $v.sidecar.admin.enabled }}
{{- $host := $v.sidecar.admin.bindAddress }}
{{- $_ := set $config "listen_admin" (printf "%s:%d" (ternary (printf "[%s]" $host) $host (contains ":" $host)) (int $v.sidecar.admin.port)) }}
{{- $_ := set $config "admin_token_file" (printf "%s/admin.token" (include "x402.adminSecretsDir" .)) }}
{{- with $v.sidecar.admin.tls }}
{{- if .existingSecret }}
{{- $_ := set $config "admin_tls_cert_file" (printf "%s/tls.crt" (include "x402.adminTlsDir" $)) }}
{{- $_ := set $config "admin_tls_key_file" (printf "%s/tls.key" (include "x402.adminTlsDir" $)) }}
{{- if .clientCaKey }}
{{- $_ := set $config "admin_tls_client_ca_file" (printf "%s/ca.crt" (include "x402.adminTlsDir" $)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- /* The exact keys are written out and quoted: toYaml leaves an address like 0x90F7…
     bare, and YAML 1.1 reads that as a hex integer. */}}
{{- $x := $v.exact }}
{{- if $x.onchain }}
onchain:
{{- range $code, $spec := $x.onchain }}
  {{ $code | quote }}:
    network: {{ $spec.network | quote }}
    {{- range $key := list "token" "name" "version" }}
    {{- if hasKey $spec $key }}
    {{ $key }}: {{ index $spec $key | quote }}
    {{- end }}
    {{- end }}
    {{- if hasKey $spec "decimals" }}
    decimals: {{ int $spec.decimals }}
    {{- end }}
    {{- if hasKey $spec "usd" }}
    usd: {{ $spec.usd }}
    {{- end }}
{{- end }}
{{- if $x.facilitators }}
facilitators:
{{- range $i, $f := $x.facilitators }}
- url: {{ $f.url | quote }}
  {{- if $f.headersSecret }}
  headers_file: {{ printf "%s/%d/headers" (include "x402.facilitatorsDir" $) $i | quote }}
  {{- else if $f.cdpApiKeySecret }}
  cdp_api_key_file: {{ printf "%s/%d/cdp_api_key.json" (include "x402.facilitatorsDir" $) $i | quote }}
  {{- end }}
{{- end }}
{{- else }}
facilitator_url: {{ $x.facilitatorUrl | quote }}
{{- end }}
facilitator_supported_seconds: {{ int $x.supportedSeconds }}
pay_to: {{ $x.payTo | quote }}
exact_max_timeout_seconds: {{ int $x.maxTimeoutSeconds }}
facilitator_verify_timeout_ms: {{ int $x.verifyTimeoutMs }}
facilitator_settle_timeout_ms: {{ int $x.settleTimeoutMs }}
chain_rpc_url: {{ $x.chainRpcUrl | quote }}
chain_lookup_ms: {{ int $x.chainLookupMs }}
topup_asset: {{ $x.topup.asset | quote }}
topup_min: {{ $x.topup.min | quote }}
topup_max: {{ $x.topup.max | quote }}
{{- end }}
{{- with $v.paywall }}
paywall:
  enabled: {{ .enabled }}
  app_name: {{ .appName | quote }}
  app_logo: {{ .appLogo | quote }}
{{- end }}
{{- with $v.channels }}
channels:
  self_serve: {{ .selfServe }}
  asset: {{ .asset | quote }}
  min_deposit: {{ .minDeposit | quote }}
  max_deposit: {{ .maxDeposit | quote }}
  max_ttl_seconds: {{ int .maxTtlSeconds }}
{{- end }}
{{- end }}

{{/* Envoy's ext_authz timeout: envoy.authzTimeout, or with `exact` the facilitator's
     verify + settle + the chain lookup + 3 ledger steps + 1s (sidecar/server/envoy/render.py
     timeouts()). */}}
{{- define "x402.authzTimeout" -}}
{{- $v := .Values }}
{{- if $v.exact.onchain }}
{{- $ms := add (int $v.exact.verifyTimeoutMs) (int $v.exact.settleTimeoutMs) (int $v.exact.chainLookupMs) (mul 3 (int $v.redis.timeoutMs)) 1000 }}
{{- $floor := add (int $v.redis.timeoutMs) 500 }}
{{- if lt $ms $floor }}{{ $ms = $floor }}{{ end }}
{{- printf "%d.%03ds" (div $ms 1000) (mod $ms 1000) }}
{{- else }}
{{- $v.envoy.authzTimeout }}
{{- end }}
{{- end }}

{{/* The top-up route's timeout ("" when top-ups are off): the check's, plus its credit
     (one ledger step) and 1s. */}}
{{- define "x402.topupTimeout" -}}
{{- $v := .Values }}
{{- $x := $v.exact }}
{{- $asset := default $v.defaultAsset $x.topup.asset }}
{{- if and $x.onchain (ne (lower $x.topup.asset) "off") (hasKey $x.onchain $asset) }}
{{- $ms := add (int $x.verifyTimeoutMs) (int $x.settleTimeoutMs) (int $x.chainLookupMs) (mul 4 (int $v.redis.timeoutMs)) 2000 }}
{{- printf "%d.%03ds" (div $ms 1000) (mod $ms 1000) }}
{{- end }}
{{- end }}
