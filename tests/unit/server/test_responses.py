"""The hand-encoded CheckResponse bytes parse back, with the real protobuf classes, to the
message the servicer used to build field by field."""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2

from sidecar.server.authz import grpc_answers as responses

OVERWRITE = HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD


def options(pairs: list[tuple[str, str]]) -> list[HeaderValueOption]:
    return [
        HeaderValueOption(header=HeaderValue(key=k, value=v), append_action=OVERWRITE)
        for k, v in pairs
    ]


def test_ok_with_headers_removals_and_metadata() -> None:
    upstream = [("x-x402-payer", "p" * 43), ("x-x402-amount", "0.25")]
    client = [("x-payment-response", "R" * 900), ("payment-response", "R" * 900)]  # > 127
    metadata = {"payer": "p" * 43, "amount": "0.25", "receipt_id": "rcpt_é"}
    expected_metadata = Struct()
    expected_metadata.update(metadata)
    expected = authz.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=authz.OkHttpResponse(
            headers=options(upstream),
            headers_to_remove=["x-payment", "payment-signature"],
            response_headers_to_add=options(client),
        ),
        dynamic_metadata=expected_metadata,
    )

    encoded = responses.ok(
        upstream, client, responses.removals(("x-payment", "payment-signature")), metadata
    )

    assert authz.CheckResponse.FromString(encoded) == expected


def test_ok_free_route_only_strips_proofs() -> None:
    encoded = responses.ok(remove_headers=responses.removals(("x-payment",)))
    parsed = authz.CheckResponse.FromString(encoded)
    assert parsed.status.code == code_pb2.OK
    assert list(parsed.ok_response.headers_to_remove) == ["x-payment"]
    assert not parsed.HasField("dynamic_metadata")


def test_denied_with_status_headers_and_a_large_body() -> None:
    """Also marked with {"x402": "denied"}, which Envoy's local-reply mappers leave alone."""
    body = b'{"error":"payment_required","x402":"' + b"x" * 20_000 + b'"}'  # 3-byte length
    headers = [("content-type", "application/json"), ("retry-after", "1")]
    mark = Struct()
    mark.update({"x402": "denied"})
    expected = authz.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=authz.DeniedHttpResponse(
            status=HttpStatus(code=402),
            headers=options(headers),
            body=body.decode(),
        ),
        dynamic_metadata=mark,
    )
    assert authz.CheckResponse.FromString(responses.denied(402, headers, body)) == expected
