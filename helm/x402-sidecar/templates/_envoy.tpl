{{/* Envoy's config: the same shape as sidecar/server/envoy/render.py render(), written as a
     template (tests/helm/test_parity.py compares the two). Every container of the pod shares
     one network namespace, so Envoy reaches the sidecar and the service on 127.0.0.1. */}}

{{- define "x402.envoyCluster" -}}
- name: {{ .name }}
  type: {{ ternary "STRICT_DNS" "STATIC" (hasKey . "address") }}
  connect_timeout: 1s
  {{- if hasKey . "address" }}
  # An existing Service by name: re-resolved as the cluster's DNS answers change.
  dns_lookup_family: V4_PREFERRED
  {{- end }}
  {{- if not .http2 }}
  per_connection_buffer_limit_bytes: 32768
  {{- end }}
  load_assignment:
    cluster_name: {{ .name }}
    endpoints:
    - lb_endpoints:
      {{- range $i := until (default 1 .count | int) }}
      - endpoint:
          address:
            socket_address:
              address: {{ default "127.0.0.1" (default $.ip $.address) }}
              port_value: {{ add $.port $i }}
      {{- end }}
{{- if .http2 }}
  typed_extension_protocol_options:
    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
      '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
      explicit_http_config:
        http2_protocol_options: {}
{{- end }}
{{- end }}

{{- /* The local-reply mappers (sidecar/server/envoy/replies.py local_reply_config): the
     sidecar's denials pass as it wrote them, Envoy's own failures in the JSON envelope of
     protocol.md §5; each with the gateway's CORS (server/envoy/browser.py cors_replies): "*" on every
     reply, or the caller's origin when it is a configured one. */}}
{{- define "x402.envoyLocalReplies" -}}
{{- $c := include "x402.contract" . | fromJson }}
{{- $origins := .Values.envoy.edge.corsOrigins }}
{{- $mappers := $c.localReplies }}
{{- $expose := dict "header" (dict "key" "access-control-expose-headers" "value" $c.corsExposeHeaders) "append_action" "OVERWRITE_IF_EXISTS_OR_ADD" }}
{{- if has "*" $origins }}
{{- $any := dict "header" (dict "key" "access-control-allow-origin" "value" "*") "append_action" "OVERWRITE_IF_EXISTS_OR_ADD" }}
{{- range $mappers }}
{{- $_ := set . "headers_to_add" (concat (default (list) .headers_to_add) (list $any $expose)) }}
{{- end }}
{{- else if $origins }}
{{- $allowed := dict "header_filter" (dict "header" (dict "name" "origin" "string_match" (dict "safe_regex" (dict "regex" (include "x402.originRegex" $origins))))) }}
{{- $cors := list (dict "header" (dict "key" "access-control-allow-origin" "value" "%REQ(origin)%") "append_action" "OVERWRITE_IF_EXISTS_OR_ADD") $expose (dict "header" (dict "key" "vary" "value" "origin") "append_action" "OVERWRITE_IF_EXISTS_OR_ADD") }}
{{- $echoed := list }}
{{- range $mappers }}
{{- $copy := deepCopy . }}
{{- $_ := set $copy "filter" (dict "and_filter" (dict "filters" (list .filter $allowed))) }}
{{- $_ := set $copy "headers_to_add" (concat (default (list) .headers_to_add) $cors) }}
{{- $echoed = append $echoed $copy }}
{{- end }}
{{- $mappers = concat $echoed $mappers }}
{{- end }}
{{- toYaml $mappers }}
{{- end }}

{{- /* The configured origins as one RE2 full match (server/envoy/browser.py origin_regex). */}}
{{- define "x402.originRegex" -}}
{{- if has "*" . }}.*{{ else }}{{ $quoted := list }}{{ range . }}{{ $quoted = append $quoted (regexQuoteMeta .) }}{{ end }}{{ join "|" $quoted }}{{ end }}
{{- end }}

{{- /* The CORS policy of a route the gateway answers itself: never credentials. */}}
{{- define "x402.envoyCorsPolicy" -}}
{{- $c := include "x402.contract" . | fromJson -}}
envoy.filters.http.cors:
  '@type': type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
  allow_origin_string_match:
  - safe_regex:
      regex: {{ include "x402.originRegex" . | toJson }}
  allow_methods: {{ $c.corsAllowMethods | toJson }}
  allow_headers: {{ $c.corsAllowHeaders | toJson }}
  expose_headers: {{ $c.corsExposeHeaders | toJson }}
  max_age: {{ $c.corsMaxAge | toJson }}
{{- end }}

{{- /* Envoy StringMatcher patterns, one `exact` per name of a list. */}}
{{- define "x402.envoyExactPatterns" -}}
patterns:
{{- range . }}
- exact: {{ . | toJson }}
{{- end }}
{{- end }}

{{- /* ext_authz's HTTP mode (sidecar/server/authz/http_transport.py): what goes to the sidecar, and
     which of its answer's headers go where. "phase": a route whose response phase runs
     says so with a header on its checks. */}}
{{- define "x402.envoyHttpService" -}}
{{- $c := include "x402.contract" .ctx | fromJson -}}
{{- $timeout := include "x402.authzTimeout" .ctx -}}
server_uri:
  uri: http://127.0.0.1:{{ int .ctx.Values.sidecar.authzHttpPort }}
  cluster: x402_authz_http
  timeout: {{ $timeout }}
path_prefix: ""
authorization_request:
  # Envoy's deadline: the ledger refuses past it, so a check Envoy gave up on never charges.
  headers_to_add:
  - key: {{ $c.timeoutHeader }}
    value: {{ include "x402.durationMs" $timeout | quote }}
  {{- if .phase }}
  - key: {{ $c.phaseHeader }}
    value: {{ $c.phaseResponse }}
  {{- end }}
authorization_response:
  allowed_upstream_headers:
    {{- include "x402.envoyExactPatterns" $c.upstreamHeaders | nindent 4 }}
  allowed_client_headers:
    {{- include "x402.envoyExactPatterns" $c.denialHeaders | nindent 4 }}
  allowed_client_headers_on_success:
    {{- include "x402.envoyExactPatterns" $c.successHeaders | nindent 4 }}
  # Each key of ext_authz's dynamic metadata travels as a header of that name.
  dynamic_metadata_from_headers:
    {{- include "x402.envoyExactPatterns" $c.metadataKeys | nindent 4 }}
{{- end }}

{{- define "x402.envoyConfig" -}}
{{- $v := .Values }}
{{- $e := $v.envoy.edge }}
{{- $c := include "x402.contract" . | fromJson -}}
{{- $ext := $c.extAuthz -}}
{{- $proc := $c.extProc -}}
{{- $http := eq $v.sidecar.transport "http" -}}
# Envoy in front of the service, with the x402 sidecar as ext_authz.
# Rendered by the x402-sidecar chart from .Values.routes; edit the values, not this file.
admin:
  address:
    socket_address:
      address: {{ $v.envoy.adminAddress | toJson }}
      port_value: {{ int $v.envoy.adminPort }}
overload_manager:
  refresh_interval: 0.25s
  resource_monitors:
  {{- if $e.maxConnections }}
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      '@type': type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: {{ int64 $e.maxConnections }}
  {{- end }}
  {{- if $e.maxHeapBytes }}
  - name: envoy.resource_monitors.fixed_heap
    typed_config:
      '@type': type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig
      max_heap_size_bytes: {{ int64 $e.maxHeapBytes }}
  actions:
  - name: envoy.overload_actions.shrink_heap
    triggers:
    - name: envoy.resource_monitors.fixed_heap
      threshold: {value: 0.95}
  - name: envoy.overload_actions.stop_accepting_requests
    triggers:
    - name: envoy.resource_monitors.fixed_heap
      threshold: {value: 0.98}
  {{- end }}
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address:
        address: 0.0.0.0
        port_value: {{ int $v.envoy.port }}
    # A second Envoy on this address fails to start instead of sharing it.
    enable_reuse_port: false
    per_connection_buffer_limit_bytes: 32768
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          # Price and proofs bind to the normalized path, never to an alias of it.
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          # The edge: the peer is the client (plus trusted proxies' X-Forwarded-For), and
          # nothing a client sends may pose as the gateway (docs/security.md).
          use_remote_address: true
          xff_num_trusted_hops: {{ int $e.xffNumTrustedHops }}
          early_header_mutation_extensions:
          - name: envoy.http.early_header_mutation.header_mutation
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation
              mutations:
              # The gateway's own x-x402-* (set by the sidecar at allow) and Envoy's x-envoy-*.
              {{- range $prefix := $c.assertedPrefixes }}
              - remove_on_match:
                  key_matcher:
                    prefix: {{ $prefix }}
                    ignore_case: true
              {{- end }}
              {{- if $e.stripMethodOverride }}
              {{- range $c.methodOverrideHeaders }}
              - remove: {{ . }}
              {{- end }}
              {{- end }}
              {{- if not $e.trustRequestId }}
              - remove: {{ $c.requestIdHeader }}
              {{- end }}
          preserve_external_request_id: {{ $e.trustRequestId }}
          always_set_request_id_in_response: true
          request_headers_timeout: {{ int $e.requestHeadersTimeoutSeconds }}s
          stream_idle_timeout: {{ int $e.streamIdleTimeoutSeconds }}s
          request_timeout: {{ int $e.requestTimeoutSeconds }}s
          # Twice the limit: the first filter answers between the two (a readable 431).
          max_request_headers_kb: {{ min (int $c.maxCodecHeadersKb) (mul 2 (int $e.maxRequestHeadersKb)) }}
          common_http_protocol_options:
            idle_timeout: {{ int $e.idleTimeoutSeconds }}s
            # x_x402_payer is x-x402-payer to CGI/WSGI services: such headers are dropped.
            headers_with_underscores_action: DROP_HEADER
          http2_protocol_options:
            max_concurrent_streams: {{ int $e.http2MaxConcurrentStreams }}
            initial_stream_window_size: 65536
            initial_connection_window_size: 1048576
          # Envoy's own failures in the JSON envelope; the sidecar's denials (marked with
          # ext_authz dynamic metadata x402) pass as the sidecar wrote them.
          local_reply_config:
            mappers:
            {{- include "x402.envoyLocalReplies" . | nindent 12 }}
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format:
                json_format:
                  time: '%START_TIME%'
                  request_id: '%REQ(X-REQUEST-ID):256%'
                  method: '%REQ(:METHOD):256%'
                  path: '%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):256%'
                  status: '%RESPONSE_CODE%'
                  duration_ms: '%DURATION%'
                  {{- range $c.accessLogKeys }}
                  {{ . }}: '%DYNAMIC_METADATA({{ $ext }}:{{ . }})%'
                  {{- end }}
          route_config:
            name: priced
            virtual_hosts:
            - name: service
              domains:
              - '*'
              # The gateway's CORS covers only its own answers (envoy.edge.corsOrigins):
              # these routes and its local replies; the service's keep their own.
              routes:
              # Discovery is free: no ext_authz, served by the sidecar's HTTP port.
              - name: x402_discovery
                match:
                  path: {{ $c.discoveryPath }}
                route:
                  cluster: x402_http
                typed_per_filter_config:
                  {{ $ext }}:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
                  {{- if $e.corsOrigins }}
                  {{- include "x402.envoyCorsPolicy" $e.corsOrigins | nindent 18 }}
                  {{- end }}
              {{- $topupTimeout := include "x402.topupTimeout" . }}
              {{- if $topupTimeout }}
              # Self-serve top-ups: the side port prices and settles them itself.
              - name: x402_topup
                match:
                  path: {{ $c.topupPath }}
                route:
                  cluster: x402_http
                  timeout: {{ $topupTimeout }}
                typed_per_filter_config:
                  {{ $ext }}:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
                  {{- if $e.corsOrigins }}
                  {{- include "x402.envoyCorsPolicy" $e.corsOrigins | nindent 18 }}
                  {{- end }}
              {{- end }}
              # Self-serve channels: agents open and close their own, signed (the side port).
              - name: x402_channels
                match:
                  prefix: {{ $c.channelPathPrefix }}
                route:
                  cluster: x402_http
                typed_per_filter_config:
                  {{ $ext }}:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
                  {{- if $e.corsOrigins }}
                  {{- include "x402.envoyCorsPolicy" $e.corsOrigins | nindent 18 }}
                  {{- end }}
              {{- if $e.corsOrigins }}
              # A browser's preflight for a payment header, on any path: Envoy answers it
              # for the configured origins; any other goes on to the service.
              - name: x402_preflight
                match:
                  prefix: /
                  headers:
                  - name: :method
                    string_match:
                      exact: OPTIONS
                  - name: origin
                    present_match: true
                  - name: access-control-request-headers
                    string_match:
                      safe_regex:
                        regex: {{ $c.paymentPreflight | toJson }}
                route:
                  cluster: service
                  timeout: {{ int $e.upstreamTimeoutSeconds }}s
                typed_per_filter_config:
                  {{- include "x402.envoyCorsPolicy" $e.corsOrigins | nindent 18 }}
              {{- end }}
              {{- range $name := include "x402.routeNames" . | splitList " " | compact }}
              {{- $route := index $v.routes $name }}
              {{- $method := default "*" $route.method }}
              - name: {{ $name | toJson }}
                match:
                  {{- if or (contains "{" $route.path) (contains "*" $route.path) }}
                  safe_regex:
                    regex: {{ include "x402.pathRegex" $route.path | toJson }}
                  {{- else }}
                  path: {{ $route.path | toJson }}
                  {{- end }}
                  {{- if eq $method "GET" }}
                  headers:
                  - name: :method
                    string_match:
                      safe_regex:
                        regex: GET|HEAD
                  {{- else if ne $method "*" }}
                  headers:
                  - name: :method
                    string_match:
                      exact: {{ $method }}
                  {{- end }}
                {{- $phase := include "x402.hasPhase" $route }}
                {{- $mcp := hasKey $route $c.mcpRouteKey }}
                {{- $timeout := int $e.upstreamTimeoutSeconds }}
                {{- if $phase }}
                {{- /* The service answers within the hold's lifetime, so it can be captured. */}}
                {{- $limit := max 1 (sub (int (default 60 $route.hold_seconds)) 1) | int }}
                {{- if or (eq $timeout 0) (gt $timeout $limit) }}{{ $timeout = $limit }}{{ end }}
                {{- end }}
                route:
                  cluster: service
                  timeout: {{ $timeout }}s
                {{- if $mcp }}
                # The request's body and the tool's answer are buffered whole, up to this.
                request_body_buffer_limit: {{ $c.mcpBufferBytes }}
                {{- end }}
                {{- if or (not $http) $phase $mcp }}
                typed_per_filter_config:
                  {{- if $http }}
                  # Priced by the sidecar's route table; the response phase runs here, or
                  # an MCP route's JSON-RPC body goes to the check.
                  {{ $ext }}:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      {{- if $phase }}
                      http_service:
                        {{- include "x402.envoyHttpService" (dict "ctx" $ "phase" true) | nindent 24 }}
                      {{- end }}
                      {{- if $mcp }}
                      with_request_body:
{{ toYaml $c.mcpRequestBody | indent 24 }}
                      {{- end }}
                  {{- else }}
                  {{ $ext }}:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      context_extensions:
                        {{ $c.extRoute }}: {{ $name | toJson }}
                        {{- if hasKey $route "price" }}
                        {{ $c.extPrice }}: {{ $route.price | toJson }}
                        {{- end }}
                        {{ $c.extAsset }}: {{ default $v.defaultAsset $route.asset | toJson }}
                        {{- if $route.description }}
                        {{ $c.extDescription }}: {{ $route.description | toJson }}
                        {{- end }}
                        {{- if $phase }}
                        {{ $c.extCharge }}: {{ $c.chargeOnSuccess }}
                        {{ $c.extPhase }}: {{ $c.phaseResponse }}
                        {{- range $key := list "failure_status" "max_units" "min_units" "hold_seconds" }}
                        {{- if hasKey $route $key }}
                        {{ index $c.phaseExtensions $key }}: {{ index $route $key | int64 | toString | toJson }}
                        {{- end }}
                        {{- end }}
                        {{- range $key := list "usage_header" "usage_missing" "unit" "unit_price" }}
                        {{- if hasKey $route $key }}
                        {{ index $c.phaseExtensions $key }}: {{ index $route $key | toString | toJson }}
                        {{- end }}
                        {{- end }}
                        {{- end }}
                        {{- if $mcp }}
                        {{- $tools := list }}
                        {{- range $tool := keys (default dict (index $route $c.mcpRouteKey).tools) | sortAlpha }}
                        {{- $tools = append $tools (printf "%s=%s" $tool (index (index $route $c.mcpRouteKey).tools $tool | toString)) }}
                        {{- end }}
                        {{ $c.extMcpTools }}: {{ join "," $tools | toJson }}
                        {{ $c.extMcpDefault }}: {{ default $c.mcpFree (index $route $c.mcpRouteKey).default | toString | toJson }}
                        {{- end }}
                      {{- if $mcp }}
                      # The MCP route's JSON-RPC body goes to the check (bounded).
                      with_request_body:
{{ toYaml $c.mcpRequestBody | indent 24 }}
                      {{- end }}
                  {{- end }}
                  {{- if and $phase (not $mcp) }}
                  # charge: on_success or metered: the response phase, the Lua filter's call
                  # to the sidecar (server/envoy/phase_call.py), runs on this route.
                  {{ $c.phaseDropName }}:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute
                    name: {{ $c.phaseCallSource }}
                  {{ $c.phaseCallName }}:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute
                    name: {{ $c.phaseCallSource }}
                  {{- else if $mcp }}
                  # An MCP route: the response phase (ext_proc) runs on this route, its
                  # answer buffered, for its settlement.
                  {{ $proc }}:
                    '@type': type.googleapis.com/envoy.config.route.v3.FilterConfig
                    config:
                      '@type': type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
                      overrides:
                        processing_mode:
{{ toYaml (ternary $c.mcpHeldProcessingMode $c.mcpChargedProcessingMode (not (empty $phase))) | indent 26 }}
                  {{- end }}
                {{- end }}
              {{- end }}
              # Unannotated paths still go through ext_authz: the sidecar's route table
              # may price them, and otherwise answers "free" without touching Redis.
              - name: service
                match:
                  prefix: /
                route:
                  cluster: service
                  timeout: {{ int $e.upstreamTimeoutSeconds }}s
          http_filters:
          # A header block over maxRequestHeadersKb, read whole: the 431; and the dashboard's
          # session cookie stripped (one Lua filter, server/envoy/headers.py).
          - name: {{ $c.headersLimitName }}
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
                  {{- $c.headersLimitLua | replace $c.headersLimitMark (toString (mul 1024 (int $e.maxRequestHeadersKb))) | nindent 18 }}
          - name: envoy.filters.http.cors
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
          - name: {{ $ext }}
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              {{- if $http }}
              http_service:
                {{- include "x402.envoyHttpService" (dict "ctx" . "phase" false) | nindent 16 }}
              # What Envoy sends of each request: what the decision reads, no cookies or bodies.
              allowed_headers:
                {{- include "x402.envoyExactPatterns" $c.httpRequestHeaders | nindent 16 }}
              {{- else }}
              grpc_service:
                envoy_grpc:
                  cluster_name: x402_authz
                timeout: {{ include "x402.authzTimeout" . }}
              # What Envoy sends of each request: what the decision reads, no cookies or bodies.
              allowed_headers:
                {{- include "x402.envoyExactPatterns" $c.authzRequestHeaders | nindent 16 }}
              {{- end }}
              # Fail closed: no sidecar answer means no free pass, and a 503.
              failure_mode_allow: false
              status_on_error:
                code: ServiceUnavailable
          {{- if include "x402.anyHeld" . }}
          # The response phase of held routes (charged on success, metered): a Lua call to
          # the sidecar's HTTP listener, with the response's body when it keeps it
          # (server/envoy/phase_call.py). Fail closed: no sidecar answer means the typed
          # 503, never the response; the hold nobody captured expires and is released.
          # The drop filter (after it on the way out) empties a refused response's body
          # that streams.
          - name: {{ $c.phaseDropName }}
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              source_codes:
                {{ $c.phaseCallSource }}:
                  inline_string: |
                    {{- $c.phaseDropLua | nindent 20 }}
          - name: {{ $c.phaseCallName }}
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              source_codes:
                {{ $c.phaseCallSource }}:
                  inline_string: |
                    {{- $c.phaseCallLua | replace $c.phaseCallKeepMark (ternary "1" "0" (gt (int $v.sidecar.retries.replayPerPayer) 0)) | replace $c.phaseCallTimeoutMark (include "x402.durationMs" (include "x402.authzTimeout" .)) | nindent 20 }}
          {{- end }}
          {{- if include "x402.anyMcp" . }}
          # The response phase of MCP routes (ext_proc over gRPC), disabled unless a route
          # enables it. Fail closed: no sidecar answer means an error, never the response;
          # the hold nobody captured expires and the ledger releases it.
          - name: {{ $proc }}
            disabled: true
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc:
                  cluster_name: x402_authz
              failure_mode_allow: false
              processing_mode:
{{ toYaml $c.headersProcessingMode | indent 16 }}
              # As the check's: with `exact`, a response phase may /settle (after success).
              message_timeout: {{ include "x402.authzTimeout" . }}
              metadata_options:
                forwarding_namespaces:
                  untyped:
                  - {{ $ext }}
              status_on_error:
                code: ServiceUnavailable
          {{- end }}
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{{ include "x402.envoyProbeListener" . | indent 2 }}
  clusters:
{{- /* Sidecar worker i serves ext_authz on grpcPort + i; each is an endpoint. */}}
{{ include "x402.envoyCluster" (dict "name" "x402_authz" "port" (int $v.sidecar.grpcPort) "http2" true "count" (int $v.sidecar.workers)) | indent 2 }}
{{- if include "x402.listensHttp" . }}
{{- /* Worker i serves HTTP/1 on authzHttpPort + i: the checks over HTTP, the phase's calls. */}}
{{ include "x402.envoyCluster" (dict "name" "x402_authz_http" "port" (int $v.sidecar.authzHttpPort) "count" (int $v.sidecar.workers)) | indent 2 }}
{{- end }}
{{ include "x402.envoyCluster" (dict "name" "x402_http" "port" (int $v.sidecar.httpPort)) | indent 2 }}
{{- /* The probe listener asks the admin API wherever it listens (an IP literal: STATIC). */}}
{{ include "x402.envoyCluster" (dict "name" "envoy_admin" "ip" $v.envoy.adminAddress "port" (int $v.envoy.adminPort)) | indent 2 }}
{{- if $v.existingService.name }}
{{ include "x402.envoyCluster" (dict "name" "service" "address" $v.existingService.name "port" (int $v.existingService.port)) | indent 2 }}
{{- else }}
{{ include "x402.envoyCluster" (dict "name" "service" "port" (int $v.app.port)) | indent 2 }}
{{- end }}
{{- end }}
