"""The admin API maps typed errors to gRPC status codes by type, never by message text."""

from __future__ import annotations

import grpc
import pytest

from sidecar.core.errors import (
    AmountError,
    ChannelExists,
    InsufficientFunds,
    InvalidKey,
    LedgerUnavailable,
    PayerSuspended,
    UnknownAsset,
    UnknownChannel,
    UnknownPayer,
    X402Error,
)
from sidecar.server.admin import grpc_code


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (LedgerUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (UnknownPayer("who"), grpc.StatusCode.NOT_FOUND),
        (UnknownChannel("exists already"), grpc.StatusCode.NOT_FOUND),  # the text is no signal
        (ChannelExists("no channel"), grpc.StatusCode.FAILED_PRECONDITION),
        (PayerSuspended("stop"), grpc.StatusCode.FAILED_PRECONDITION),
        (InsufficientFunds("poor"), grpc.StatusCode.FAILED_PRECONDITION),
        (AmountError("1.0000001"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidKey("key"), grpc.StatusCode.INVALID_ARGUMENT),
        (UnknownAsset("XYZ"), grpc.StatusCode.INVALID_ARGUMENT),
        (X402Error("anything else"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_errors_map_to_grpc_codes_by_type(error: X402Error, code: grpc.StatusCode) -> None:
    assert grpc_code(error) == code
