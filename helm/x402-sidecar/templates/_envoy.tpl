{{/* Envoy's config: the same shape as sidecar/envoy_config.py render(), written as a
     template (tests/test_helm.py compares the two). Every container of the pod shares
     one network namespace, so Envoy reaches the sidecar and the service on 127.0.0.1. */}}

{{- define "x402.envoyCluster" -}}
- name: {{ .name }}
  type: STATIC
  connect_timeout: 1s
  load_assignment:
    cluster_name: {{ .name }}
    endpoints:
    - lb_endpoints:
      {{- range $i := until (default 1 .count | int) }}
      - endpoint:
          address:
            socket_address:
              address: 127.0.0.1
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

{{- define "x402.envoyConfig" -}}
{{- $v := .Values }}
{{- $ext := "envoy.filters.http.ext_authz" -}}
# Envoy in front of the service, with the x402 sidecar as ext_authz.
# Rendered by the x402-sidecar chart from .Values.routes; edit the values, not this file.
admin:
  address:
    socket_address:
      address: 127.0.0.1
      port_value: {{ int $v.envoy.adminPort }}
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address:
        address: 0.0.0.0
        port_value: {{ int $v.envoy.port }}
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
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format:
                json_format:
                  time: '%START_TIME%'
                  request_id: '%REQ(X-REQUEST-ID)%'
                  method: '%REQ(:METHOD)%'
                  path: '%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%'
                  status: '%RESPONSE_CODE%'
                  duration_ms: '%DURATION%'
                  payer: '%DYNAMIC_METADATA({{ $ext }}:payer)%'
                  amount: '%DYNAMIC_METADATA({{ $ext }}:amount)%'
                  receipt_id: '%DYNAMIC_METADATA({{ $ext }}:receipt_id)%'
          route_config:
            name: priced
            virtual_hosts:
            - name: service
              domains:
              - '*'
              routes:
              # Discovery is free: no ext_authz, served by the sidecar's HTTP port.
              - name: x402_discovery
                match:
                  path: /.well-known/x402
                route:
                  cluster: x402_http
                typed_per_filter_config:
                  {{ $ext }}:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
              {{- range $name := include "x402.routeNames" . | splitList " " | compact }}
              {{- $route := index $v.routes $name }}
              {{- $method := default "*" $route.method }}
              - name: {{ $name | toJson }}
                match:
                  {{- if contains "{" $route.path }}
                  safe_regex:
                    regex: {{ include "x402.pathRegex" $route.path | toJson }}
                  {{- else }}
                  path: {{ $route.path | toJson }}
                  {{- end }}
                  {{- if ne $method "*" }}
                  headers:
                  - name: :method
                    string_match:
                      exact: {{ $method }}
                  {{- end }}
                route:
                  cluster: service
                typed_per_filter_config:
                  {{ $ext }}:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      context_extensions:
                        x402.route: {{ $name | toJson }}
                        x402.price: {{ $route.price | toJson }}
                        x402.asset: {{ default $v.defaultAsset $route.asset | toJson }}
                        {{- if $route.description }}
                        x402.description: {{ $route.description | toJson }}
                        {{- end }}
              {{- end }}
              # Unannotated paths still go through ext_authz: the sidecar's route table
              # may price them, and otherwise answers "free" without touching Redis.
              - name: service
                match:
                  prefix: /
                route:
                  cluster: service
          http_filters:
          - name: {{ $ext }}
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              grpc_service:
                envoy_grpc:
                  cluster_name: x402_authz
                timeout: {{ $v.envoy.authzTimeout }}
              # Fail closed: no sidecar answer means no free pass, and a 503.
              failure_mode_allow: false
              status_on_error:
                code: ServiceUnavailable
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{{- /* Sidecar worker i serves ext_authz on grpcPort + i; each is an endpoint. */}}
{{ include "x402.envoyCluster" (dict "name" "x402_authz" "port" (int $v.sidecar.grpcPort) "http2" true "count" (int $v.sidecar.workers)) | indent 2 }}
{{ include "x402.envoyCluster" (dict "name" "x402_http" "port" (int $v.sidecar.httpPort)) | indent 2 }}
{{ include "x402.envoyCluster" (dict "name" "service" "port" (int $v.app.port)) | indent 2 }}
{{- end }}
