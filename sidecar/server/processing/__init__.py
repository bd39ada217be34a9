"""The response phase: the decision (phase.py) and Envoy's ext_proc over either transport
(grpc_transport.py, http_transport.py)."""
