"""The response phase: the decision (phase.py), Envoy's Lua call for held routes
(http_transport.py) and its ext_proc stream for MCP routes (grpc_transport.py)."""
