"""Coverage-guided fuzzing of proof parsing and verification with atheris (libFuzzer).

Every input must end in a typed PaymentError whose reason is in PROTOCOL.md's table;
any other exception crashes the fuzzer. Run: python tests/fuzz/atheris_proof.py -runs=50000
"""

from __future__ import annotations

import base64
import sys

import atheris

with atheris.instrument_imports():
    from sidecar.core import decision, protocol
    from sidecar.core.decision import Gateway, Request
    from sidecar.core.errors import BY_REASON, PaymentError
    from sidecar.core.identity import Identity
    from sidecar.core.money import Asset
    from sidecar.core.pricing import Price

GATEWAY = Gateway(Identity.generate(), b"f" * 32)
PRICE = Price("atlas", 250_000, Asset("USDF", 6))
NOW = 1_763_711_000
WALLET = Identity.generate()
VALID = protocol.sign_proof(
    decision.invoice(Request("GET", "/a"), PRICE, GATEWAY, NOW - 10), WALLET
)
VALID_JSON = protocol.canonical_json(VALID)
TYPED = set(BY_REASON) - {"internal_error"}


def header_from(fdp: atheris.FuzzedDataProvider) -> str:
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:  # free-form header text
        text: str = fdp.ConsumeUnicodeNoSurrogates(8192)
        return text
    if mode == 1:  # arbitrary bytes behind valid base64: the JSON parser's turn
        return base64.b64encode(fdp.ConsumeBytes(4096)).decode()
    if mode == 2:  # a valid proof with one field replaced by anything
        field = fdp.PickValueInList([*protocol.PROOF_FIELDS, "x402Version", "extra"])
        kind = fdp.ConsumeIntInRange(0, 3)
        value: object = (
            fdp.ConsumeUnicodeNoSurrogates(64),
            fdp.ConsumeInt(16),
            None,
            [fdp.ConsumeUnicodeNoSurrogates(8)],
        )[kind]
        return protocol.encode_header({**VALID, field: value})
    at = fdp.ConsumeIntInRange(0, len(VALID_JSON))  # bytes spliced into valid JSON
    raw = VALID_JSON[:at] + fdp.ConsumeBytes(64) + VALID_JSON[at:]
    return base64.b64encode(raw).decode()


def one_input(data: bytes) -> None:
    request = Request("GET", "/a", proof_header=header_from(atheris.FuzzedDataProvider(data)))
    try:
        decision.verify_payment(request, PRICE, GATEWAY, NOW)
    except PaymentError as error:
        if error.reason not in TYPED:
            raise AssertionError(f"untyped reason {error.reason!r}") from error
        decision.deny(error, request, PRICE, GATEWAY, NOW)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
