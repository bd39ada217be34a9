"""Envoy's ext_authz check: the transport-free decision (check.py), its two transports
(grpc_transport.py, http_transport.py) and their answer encoders (grpc_answers.py; the
HTTP answers beside their transport)."""
