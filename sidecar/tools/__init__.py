"""Tools by and for people: the `x402` CLI, `x402 pay`, the demo, the stack harness, the
load runner, the Envoy config renderer, the local chain and the x402 facilitator."""
