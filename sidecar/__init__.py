"""x402 sidecar: HTTP 402 payments for any API behind Envoy."""
