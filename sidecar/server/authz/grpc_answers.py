"""Envoy's ext_authz CheckResponse, encoded straight to protobuf bytes from prebuilt pieces.

Building the message with the protobuf classes (HeaderValueOption lists, a Struct for the
metadata) and serializing it costs several times more Python per check than concatenating
the bytes (docs/performance.md, "The hot path"). The gRPC server sends these bytes as they
are. Field numbers come from the generated descriptors, so a changed .proto cannot
silently shift them, and the tests parse every shape back with the real classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.descriptor import Descriptor
from google.protobuf.struct_pb2 import Struct, Value
from google.rpc import code_pb2, status_pb2

from sidecar.core import decision, protocol
from sidecar.server.envoy.contract import DENIAL_METADATA

_LEN, _VARINT = 2, 0  # protobuf wire types


def _number(message: Descriptor, name: str) -> int:
    return int(message.fields_by_name[name].number)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(message: Descriptor, name: str, wire: int = _LEN) -> bytes:
    return _varint(_number(message, name) << 3 | wire)


_SIZES = [_varint(size) for size in range(1 << 14)]  # every length prefix up to 16 KiB


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    size = len(payload)
    return tag + (_SIZES[size] if size < 1 << 14 else _varint(size)) + payload


_RESPONSE = authz.CheckResponse.DESCRIPTOR
_OK_HTTP = authz.OkHttpResponse.DESCRIPTOR
_DENIED_HTTP = authz.DeniedHttpResponse.DESCRIPTOR
_OPTION = HeaderValueOption.DESCRIPTOR
_HEADER = HeaderValue.DESCRIPTOR

STATUS, DENIED, OK_HTTP, METADATA = (
    _tag(_RESPONSE, n) for n in ("status", "denied_response", "ok_response", "dynamic_metadata")
)
OK_HEADERS, OK_REMOVE, OK_RESPONSE_HEADERS = (
    _tag(_OK_HTTP, n) for n in ("headers", "headers_to_remove", "response_headers_to_add")
)
DENIED_STATUS, DENIED_HEADERS, DENIED_BODY = (
    _tag(_DENIED_HTTP, n) for n in ("status", "headers", "body")
)
OPTION_HEADER = _tag(_OPTION, "header")
HEADER_KEY, HEADER_VALUE = _tag(_HEADER, "key"), _tag(_HEADER, "value")
STRUCT_FIELDS = _tag(Struct.DESCRIPTOR, "fields")
ENTRY_KEY, ENTRY_VALUE = b"\x0a", b"\x12"  # map entries: key = 1, value = 2
STRING_VALUE = _tag(Value.DESCRIPTOR, "string_value")
# Envoy's default appends a header that already exists; these replace it instead.
OVERWRITE = _tag(_OPTION, "append_action", _VARINT) + _varint(
    HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
)
HTTP_STATUS_CODE = _tag(HttpStatus.DESCRIPTOR, "code", _VARINT)

_OK_STATUS = _field(STATUS, status_pb2.Status(code=code_pb2.OK).SerializeToString())
_DENIED_STATUS = _field(
    STATUS, status_pb2.Status(code=code_pb2.PERMISSION_DENIED).SerializeToString()
)


@lru_cache(maxsize=256)
def _key(name: str) -> bytes:
    """A header name's encoded bytes; the same few names recur on every check."""
    return _field(HEADER_KEY, name.encode())


def _option(name: str, value: str) -> bytes:
    header = _key(name) + _field(HEADER_VALUE, value.encode())
    return _field(OPTION_HEADER, header) + OVERWRITE


def _options(tag: bytes, headers: Iterable[tuple[str, str]]) -> bytes:
    return b"".join(_field(tag, _option(name, value)) for name, value in headers)


def ok(
    upstream_headers: Iterable[tuple[str, str]] = (),
    response_headers: Iterable[tuple[str, str]] = (),
    remove_headers: bytes = b"",
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Allow: headers for the upstream, headers for the client's response, headers to strip
    (from `removals`, prebuilt), and string dynamic metadata for Envoy's access log."""
    body = (
        _options(OK_HEADERS, upstream_headers)
        + remove_headers
        + _options(OK_RESPONSE_HEADERS, response_headers)
    )
    message = _OK_STATUS + _field(OK_HTTP, body)
    if metadata:
        message += _field(METADATA, b"".join(_entry(k, v) for k, v in metadata.items()))
    return message


def _entry(key: str, value: str) -> bytes:
    """One `fields` entry of a Struct: key → Value{string_value}."""
    string = _field(ENTRY_VALUE, _field(STRING_VALUE, value.encode()))
    return _field(STRUCT_FIELDS, _field(ENTRY_KEY, key.encode()) + string)


def removals(names: Iterable[str]) -> bytes:
    """Prebuilt headers_to_remove, for `ok`."""
    return b"".join(_field(OK_REMOVE, name.encode()) for name in names)


_DENIAL_MARK = _field(METADATA, b"".join(_entry(k, v) for k, v in DENIAL_METADATA.items()))


def denied(status: int, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    """Deny with an HTTP status, headers and a body of Envoy's local reply, marked as the
    sidecar's own denial (DENIAL_METADATA)."""
    http_status = _field(DENIED_STATUS, HTTP_STATUS_CODE + _varint(status))
    message = http_status + _options(DENIED_HEADERS, headers) + _field(DENIED_BODY, body)
    return _DENIED_STATUS + _field(DENIED, message) + _DENIAL_MARK


class GrpcAnswers:
    """The gRPC transport's answers (check.Answers): CheckResponse bytes."""

    # Proof headers are bearer material: stripped before any request, free or paid, goes on.
    _REMOVE_PROOFS = removals(protocol.PROOF_HEADERS)
    # What the gateway asserts to the service is never the client's word: on a free request
    # it is removed (Envoy strips every x-x402-* at the edge too); a paid one overwrites it.
    free = ok(remove_headers=_REMOVE_PROOFS + removals(decision.UPSTREAM_HEADERS))

    def ok(
        self,
        upstream: Iterable[tuple[str, str]],
        response: Iterable[tuple[str, str]],
        metadata: Mapping[str, str],
    ) -> bytes:
        return ok(upstream, response, self._REMOVE_PROOFS, metadata)

    def denied(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
        return denied(status, headers, body)
