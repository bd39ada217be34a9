"""Key rotation end to end (Redis, the sidecar, Envoy): receipts signed before and after a
rotation, with an agent still paying the previous payee from its cached discovery document
and a channel opened to the previous key, all settled, exported and verified offline with
the published key set."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.ledger import settlement
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import Channels
from sidecar.tools.stack import Stack
from tests.support.cli import x402
from tests.support.payers import b64json, funded_payer, voucher_header
from tests.support.routes import ROUTES, VERIFY, VERIFY_PRICE
from tests.support.settlement import settle


@pytest.fixture
async def rotating(tmp_path: Path) -> AsyncIterator[tuple[Stack, Ledger]]:
    with Stack(ROUTES, workdir=tmp_path) as stack:
        ledger = Ledger.from_url(stack.redis_url)
        try:
            yield stack, ledger
        finally:
            await ledger.close()


def rotate(stack: Stack) -> Identity:
    """The operator's rotation: a new current key, the old one kept as previous, and a
    restart of the sidecar (Envoy and Redis stay up)."""
    new = Identity.generate()
    new.save(stack.dir / "signing-2.key")
    config = yaml.safe_load(stack.config_path.read_text())
    config["signing_key_file"] = str(stack.dir / "signing-2.key")
    config["previous_signing_key_files"] = [str(stack.dir / "signing.key")]
    stack.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    stack.processes["sidecar"].stop()
    stack.start_sidecar()
    return new


async def pay(client: httpx.AsyncClient, wallet: Identity, payee: str, n: int) -> dict[str, Any]:
    """A direct payment to `payee`, as an agent whose discovery document names it."""
    path = VERIFY.format(n=n)
    terms = protocol.direct_terms(f"GET {path}", "USDF", "0.01", payee, int(time.time()) + 60)
    proof = protocol.encode_header(protocol.sign_proof(terms, wallet))
    response = await client.get(path, headers={"X-Payment": proof})
    assert response.status_code == 200, response.text
    receipt: dict[str, Any] = b64json(response.headers["x-payment-response"])
    return receipt


async def vouch(
    client: httpx.AsyncClient, stack: Stack, wallet: Identity, channel: str, payee: str, n: int
) -> dict[str, Any]:
    """The n-th voucher of `channel` (0.01 each), naming `payee`."""
    path = VERIFY.format(n=n)
    header = voucher_header(
        stack, wallet, channel_id=channel, cumulative=f"0.0{n}", sequence=n,
        resource=f"GET {path}", payee=payee,
    )  # fmt: skip
    response = await client.get(path, headers=header)
    assert response.status_code == 200, response.text
    receipt: dict[str, Any] = b64json(response.headers["x-payment-response"])
    return receipt


async def test_receipts_across_a_rotation_all_verify_with_the_published_key_set(
    rotating: tuple[Stack, Ledger], tmp_path: Path
) -> None:
    stack, ledger = rotating
    old = stack.gateway_identity
    wallet = await funded_payer(ledger, 100 * VERIFY_PRICE)
    channel, _balance = await Channels(ledger).open(
        wallet.public_key, "USDF", 5 * VERIFY_PRICE, old.kid
    )
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        cached = (await client.get("/.well-known/x402")).json()  # what agents keep
        before = [await pay(client, wallet, old.kid, n) for n in range(3)]
        vouchers = [await vouch(client, stack, wallet, channel, old.kid, 1)]

        new = rotate(stack)

        published = (await client.get("/.well-known/x402")).json()
        after = [await pay(client, wallet, new.kid, n) for n in range(3, 5)]
        # The grace period: an agent paying from its cached document is served, and its
        # receipt is signed by the key it paid, which its cached document holds.
        grace = [await pay(client, wallet, cached["payee"], n) for n in range(5, 7)]
        # The channel opened to the old key works on, whichever key the voucher names.
        vouchers += [
            await vouch(client, stack, wallet, channel, old.kid, 2),
            await vouch(client, stack, wallet, channel, new.kid, 3),
        ]
    assert published["payee"] == new.kid
    assert [(k["kid"], k["public_key"], k["status"]) for k in published["keys"]] == [
        (new.kid, new.public_key, "current"),
        (old.kid, old.public_key, "previous"),
    ]
    published_keys = {k["kid"]: k["public_key"] for k in published["keys"]}
    cached_keys = {k["kid"]: k["public_key"] for k in cached["keys"]}
    assert [r["kid"] for r in before + after + grace] == [old.kid] * 3 + [new.kid] * 2 + [
        old.kid
    ] * 2
    assert [r["payee"] for r in grace] == [old.kid] * 2
    assert all(protocol.verify_receipt(r, cached_keys) for r in before + grace)
    assert all(protocol.verify_receipt(r, published_keys) for r in before + after + grace)
    assert [r["kid"] for r in vouchers] == [old.kid, old.kid, new.kid]
    assert all(protocol.verify_receipt(r, published_keys) for r in vouchers)

    run = await x402(
        "channel", "close", wallet.public_key, channel, "--config", str(stack.config_path)
    )
    assert run.code == 0, run.err
    run = await settle(stack, "--batch-size", "100", "--anchor-file", str(tmp_path / "a.jsonl"))
    assert run.code == 0, run.err

    # One batch per signing key's run of receipts: settled after the rotation, what the old
    # key signed is still signed by it (the channel's close too: it was opened to it).
    batches = await settlement.payer_batches(ledger, wallet.public_key)
    assert [(m["kid"], m["count"]) for m in batches] == [
        (old.kid, 3),
        (new.kid, 2),
        (old.kid, 3),  # the two grace payments and the channel's close
    ]

    bundle = tmp_path / "bundle.json"
    run = await x402(
        "evidence", "export", "--payer", wallet.public_key, "--out", str(bundle),
        "--config", str(stack.config_path),
    )  # fmt: skip
    assert run.code == 0, run.err
    exported = json.loads(bundle.read_text())["receipts"]
    assert [i["receipt"] for i in exported][:7] == before + after + grace

    discovery = tmp_path / "x402.json"
    discovery.write_text(json.dumps(published))
    for keys in (
        ["--key", str(discovery)],  # the saved discovery document: the whole set
        ["--key", old.public_key, "--key", new.public_key],
    ):
        run = await x402("evidence", "verify", str(bundle), *keys)
        assert run.code == 0, run.out
        assert run.out.strip() == "OK: 8 receipts in 3 batches verify"
    # The current key alone cannot vouch for what the previous key signed, and says so.
    run = await x402("evidence", "verify", str(bundle), "--key", new.public_key)
    assert run.code == 1
    assert f"signed by '{old.kid}', not a key of the set ({new.kid})" in run.out
    # A --key that is neither a key nor a discovery document is refused, naming the flag.
    run = await x402("evidence", "verify", str(bundle), "--key", "not-a-key")
    assert run.code != 0 and "--key not-a-key: no public key nor discovery document" in run.err
