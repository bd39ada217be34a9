"""What a recorded response keeps (server/replays.py, docs/protocol.md §13)."""

from __future__ import annotations

from sidecar.server import replays
from sidecar.server.processing import grpc_transport
from sidecar.server.processing.answers import Continue, immediate

HEADERS = [
    (":status", "200"),
    ("content-type", "application/json"),
    ("transfer-encoding", "chunked"),
    ("connection", "close"),
    ("x402-usage", "7"),
    ("payment-response", "forged"),
    ("etag", '"v1"'),
]


def test_a_response_keeps_its_status_representation_headers_and_body() -> None:
    body = '{"ok": "é"}'.encode()
    kept = replays.recorded({replays.RESPONSE: replays.encode(201, HEADERS, body, 64)})
    assert kept == replays.Recorded(
        201, (("content-type", "application/json"), ("etag", '"v1"')), body
    )


def test_what_is_not_kept_is_redelivered() -> None:
    assert replays.encode(200, HEADERS, b"x" * 65, 64) == ""  # over the limit
    assert replays.encode(200, HEADERS, None, 64) == ""  # not seen whole
    assert replays.encode(500, HEADERS, b"", 64) == ""  # a failure keeps nothing
    assert replays.encode(200, HEADERS, b"\x00\xff", 64) == ""  # not text
    assert replays.recorded({}) is None
    assert replays.recorded({replays.RESPONSE: "{not json"}) is None


def test_the_receipt_headers_follow_the_services() -> None:
    kept = replays.Recorded(200, (("content-type", "text/plain"),), b"")
    headers = replays.answer_headers(kept, {"receipt_id": "r"}, "RECEIPT", None)
    assert headers[0] == ("content-type", "text/plain")
    assert ("payment-response", "RECEIPT") in headers and (
        "x-payment-response",
        "RECEIPT",
    ) in headers


def test_an_answer_to_the_body_sets_the_held_back_headers_and_the_body() -> None:
    """Envoy holds buffered headers until the body is answered: the body's answer carries
    the receipt headers (and an MCP result's new body)."""
    answer = Continue((("payment-response", "R"),), ("x402-usage",), b"new")
    body = grpc_transport.message(answer, "response_body")
    assert body.WhichOneof("response") == "response_body"
    common = body.response_body.response
    assert list(common.header_mutation.remove_headers) == ["x402-usage"]
    assert [h.header.key for h in common.header_mutation.set_headers] == ["payment-response"]
    assert common.body_mutation.body == b"new"
    plain = grpc_transport.message(Continue(), "response_body")
    assert plain.WhichOneof("response") == "response_body"
    assert not plain.response_body.HasField("response")
    refused = grpc_transport.message(immediate(503, "internal_error", "no"), "response_body")
    assert refused.immediate_response.status.code == 503
