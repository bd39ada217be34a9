{{/* Envoy's readiness for the kubelet: the admin API stays on 127.0.0.1, so a listener on
     the pod's address answers GET /ready alone, by asking the admin's /ready (LIVE: 200;
     after the preStop's /healthcheck/fail: 503). Nothing else of the admin is reachable. */}}
{{- define "x402.envoyProbeListener" -}}
- name: probe
  address:
    socket_address:
      address: 0.0.0.0
      port_value: {{ int .Values.envoy.probePort }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: probe
        route_config:
          virtual_hosts:
          - name: probe
            domains: ["*"]
            routes:
            - match:
                path: /ready
                headers:
                - name: :method
                  string_match: {exact: GET}
              route: {cluster: envoy_admin, timeout: 2s}
            - match: {prefix: /}
              direct_response: {status: 404}
        http_filters:
        - name: envoy.filters.http.router
          typed_config:
            '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{{- end }}
