"""What a recorded response keeps (server/replays.py, docs/protocol.md §13)."""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from sidecar.server import replays

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


def test_a_headers_answer_becomes_the_bodys_answer() -> None:
    mutation = ext_proc.HeaderMutation(remove_headers=["x402-usage"])
    headers = ext_proc.ProcessingResponse(
        response_headers=ext_proc.HeadersResponse(
            response=ext_proc.CommonResponse(header_mutation=mutation)
        )
    )
    body = replays.at_body(headers)
    assert body.WhichOneof("response") == "response_body"
    assert list(body.response_body.response.header_mutation.remove_headers) == ["x402-usage"]
    immediate = ext_proc.ProcessingResponse(immediate_response=ext_proc.ImmediateResponse())
    assert replays.at_body(immediate) is immediate
