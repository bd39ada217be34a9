"""Hostile input through the real servicer (real Redis): always a typed reason, never a bug.

`internal_error` counts as a failure here: it means an input reached an unhandled path.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core import protocol
from sidecar.core.errors import BY_REASON
from sidecar.core.identity import Identity
from sidecar.server.authz.check import CheckService
from sidecar.server.logs import DecisionLog
from sidecar.tools.stack import Stack
from tests.support.inprocess import Outcome, check, check_request, servicer_for

TYPED = set(BY_REASON) - {"internal_error"}
ATLAS = "/api/v1/agent/pay-api/atlas"
ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
L = 2**252 + 27742317777372353535851937790883648493  # the order of Ed25519's group


class Harness:
    """The real servicer on its own event loop, so hypothesis can drive it synchronously."""

    def __init__(self, stack: Stack) -> None:
        self.loop = asyncio.new_event_loop()
        self.stack = stack
        self.servicer: CheckService
        self.servicer, self.ledger = servicer_for(stack)
        self.wallet = Identity.generate()
        self.run(self.ledger.register(self.wallet.public_key))
        self.run(self.ledger.credit(self.wallet.public_key, "USDF", 10**12, "fuzz"))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def valid_proof(self, path: str = ATLAS) -> dict[str, Any]:
        return protocol.sign_proof(
            {
                "version": protocol.VERSION,
                "scheme": protocol.SCHEME,
                "nonce": protocol.new_nonce(),
                "resource": f"GET {path}",
                "asset": "USDF",
                "amount": "0.25",
                "payee": self.stack.gateway_identity.kid,
                "expires_at": int(time.time()) + 60,
            },
            self.wallet,
        )

    def send(
        self, header: str | None, path: str = ATLAS, extra_headers: dict[str, str] | None = None
    ) -> Outcome:
        headers = dict(extra_headers or {})
        if header is not None:
            headers["x-payment"] = header
        return self.run(check(self.servicer, check_request("GET", path, headers)))

    def close(self) -> None:
        self.run(self.ledger.close())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(stack: Stack) -> Iterator[Harness]:
    running = Harness(stack)
    yield running
    running.close()


def assert_typed(result: Outcome, *allowed: str) -> None:
    assert result.reason in (set(allowed) or TYPED), result
    if result.reason != "allow":
        assert result.status == BY_REASON[result.reason].status
        assert result.body["message"]


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(
    st.text(max_size=5000)
    | st.binary(max_size=3000).map(lambda raw: base64.b64encode(raw).decode())
)
def test_arbitrary_headers(harness: Harness, header: str) -> None:
    assert_typed(harness.send(header))


@FUZZ
@given(
    st.sampled_from([*protocol.PROOF_FIELDS, "x402Version", "unknown"]), json_values, st.booleans()
)
def test_structured_mutations_of_a_valid_proof(
    harness: Harness, field: str, value: Any, delete: bool
) -> None:
    original = harness.valid_proof()
    proof = dict(original)
    if delete:
        proof.pop(field, None)
    else:
        proof[field] = value
    result = harness.send(protocol.encode_header(proof))
    if proof == original:  # deleting an absent field changes nothing: it pays
        assert_typed(result, "allow")
    else:
        assert_typed(result)


def test_explicit_hostile_cases(harness: Harness) -> None:
    valid = harness.valid_proof()
    canonical = protocol.canonical_json(valid).decode()
    duplicate = canonical[:-1] + ',"amount":"0.01"}'
    huge = canonical.replace(f'"expires_at":{valid["expires_at"]}', '"expires_at":1' + "0" * 5000)
    signature = base64.urlsafe_b64decode(valid["signature"] + "==")
    s_plus_l = (int.from_bytes(signature[32:], "little") + L).to_bytes(32, "little")
    malleated = base64.urlsafe_b64encode(signature[:32] + s_plus_l).rstrip(b"=").decode()
    cases: list[tuple[str, str]] = [
        (base64.b64encode(duplicate.encode()).decode(), "malformed_payment"),
        (base64.b64encode(b"\xc3\x28" + canonical.encode()).decode(), "malformed_payment"),
        (base64.b64encode(b"[" * 2000 + b"]" * 2000).decode(), "malformed_payment"),
        (protocol.encode_header({**valid, "expires_at": 10**400}), "invoice_expired"),
        (base64.b64encode(huge.encode()).decode(), "malformed_payment"),  # > 4300 digits
        (protocol.encode_header({**valid, "amount": "-0.25"}), "malformed_payment"),
        (protocol.encode_header({**valid, "amount": "0.2500001"}), "malformed_payment"),
        (protocol.encode_header({**valid, "amount": 0.25}), "malformed_payment"),
        (
            protocol.encode_header({**valid, "signature": valid["signature"] + "="}),
            "invalid_signature",
        ),  # non-canonical base64url
        (protocol.encode_header({**valid, "signature": malleated}), "invalid_signature"),
        (protocol.encode_header({**valid, "payer": valid["payer"][:-2]}), "malformed_payment"),
        (protocol.encode_header({**valid, "payer": valid["payer"] + "AA"}), "malformed_payment"),
        # a Cyrillic a (U+0430) in the resource: a lookalike is another resource
        (
            protocol.encode_header(
                {**valid, "resource": valid["resource"].replace("atlas", "atl\u0430s")}
            ),
            "invoice_mismatch",
        ),
        (" " + protocol.encode_header(valid)[:-4] + "\n\t", "malformed_payment"),
    ]
    for header, reason in cases:
        assert_typed(harness.send(header), reason)


def test_header_floods_and_very_long_paths(harness: Harness) -> None:
    flood = {f"x-flood-{i}": "v" * 100 for i in range(5000)}
    assert_typed(harness.send(None, extra_headers=flood), "payment_required")
    long_trade = "/api/v1/trade/verify/" + "7" * 100_000
    proof = protocol.encode_header(harness.valid_proof())
    assert_typed(harness.send(proof, path=long_trade), "invoice_mismatch")
    assert_typed(harness.send(proof, path="/" + "a/" * 50_000), "allow")  # free: not priced


def test_a_valid_proof_still_pays_after_all_that(harness: Harness) -> None:
    assert_typed(harness.send(protocol.encode_header(harness.valid_proof())), "allow")


def test_logs_never_carry_proofs_signatures_or_keys(harness: Harness) -> None:
    proofs = [harness.valid_proof() for _ in range(3)]
    lines = io.StringIO()  # the servicer's decision lines (they bypass structlog)
    harness.servicer.decisions = DecisionLog(stream=lines)
    for proof in proofs:
        harness.send(protocol.encode_header(proof))
        harness.send(protocol.encode_header({**proof, "amount": "9"}))
    harness.servicer.decisions.flush()
    entries = [json.loads(line) for line in lines.getvalue().splitlines()]
    text = json.dumps(entries)
    assert len(entries) == 6 and {e["event"] for e in entries} == {"authz.decision"}
    for proof in proofs:
        assert proof["signature"] not in text
        assert protocol.encode_header(proof)[:40] not in text
    assert harness.wallet.seed_text not in text
    assert harness.stack.gateway_identity.seed_text not in text


def test_coverage_guided_fuzzing_with_atheris() -> None:
    runs = 60_000
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "fuzz" / "atheris_proof.py"),
            f"-runs={runs}",
            "-max_len=4096",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT / "tests" / "fuzz",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} runs" in result.stderr
