"""Tools around the product: the local chain harness and the x402 facilitator."""
