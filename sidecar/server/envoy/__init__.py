"""The contract with Envoy (contract.py: every header name, metadata key and route
annotation both transports, the response phase, the renderer and the chart share) and the
Envoy config renderer (render.py and its parts) that `x402 envoy-config` and the chart use."""
