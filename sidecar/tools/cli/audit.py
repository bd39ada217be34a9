"""The operator's audit commands: evidence bundles (export, verify), on-chain anchors of
settlement batches, and reconciliation of the ledger with the chain."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from sidecar.core.errors import X402Error
from sidecar.tools.cli.base import (
    config_option,
    ledger_call,
    main,
    redis_option,
)

if TYPE_CHECKING:
    from sidecar.ledger.accounts import Ledger
    from sidecar.server.config import Settings


@main.group()
def evidence() -> None:
    """Export and verify evidence bundles (receipts, Merkle proofs, signed manifests)."""


def _unix_time(value: str | None) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise X402Error(f"{value!r} is neither unix seconds nor an ISO 8601 time") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


@evidence.command("export")
@click.option("--receipt", "receipt_id", default=None, help="One receipt id (rcpt_…).")
@click.option("--payer", "payer_key", default=None, help="One payer's receipts.")
@click.option("--since", default=None, help="Issued at or after (unix seconds or ISO 8601).")
@click.option("--until", default=None, help="Issued before (unix seconds or ISO 8601).")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@redis_option
@config_option
def evidence_export(
    receipt_id: str | None,
    payer_key: str | None,
    since: str | None,
    until: str | None,
    out: str,
    redis_url: str | None,
    config_path: str | None,
) -> None:
    """Write the settled receipts a query matches, their proofs and manifests, signed."""
    import json

    from sidecar.ledger import evidence as bundles

    if not (receipt_id or payer_key or since or until):
        raise X402Error("say what to export: --receipt, --payer, --since/--until")
    query = bundles.Query(receipt_id, payer_key, _unix_time(since), _unix_time(until))

    async def op(ledger: Ledger, settings: Settings) -> bundles.Export:
        chain = settings.anchor_chain_config()
        contract = chain.contract if chain is not None else None
        keys, assets = settings.signing_keys(), settings.asset_table()
        return await bundles.export(ledger, keys, assets, query, contract)

    result = ledger_call(redis_url, config_path, op)
    receipts = len(result.bundle["receipts"])
    if receipt_id and not receipts:
        raise X402Error(f"receipt {receipt_id} is in no settled batch (run x402 settle)")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result.bundle, f, indent=1, sort_keys=True)
    click.echo(f"wrote {out}: {receipts} receipts in {len(result.bundle['batches'])} batches")
    if result.unsettled:
        click.echo(f"{result.unsettled} matching receipts are not settled yet (not exported)")
    if result.expired:
        click.echo(
            f"{result.expired} batches are past receipt_retention_seconds: their receipts "
            "left the ledger (their manifests remain in anchor_file)"
        )


@evidence.command("verify")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--key",
    "keys",
    required=True,
    multiple=True,
    help="A gateway public key (base64url), or a file holding one, or the gateway's "
    "discovery document (/.well-known/x402) saved as JSON: its whole key set. Repeatable: "
    "after a rotation, the previous keys too.",
)
@click.option(
    "--chain",
    "rpc_url",
    default=None,
    help="Also prove every receipt against the Merkle root anchored on this chain "
    "(its JSON-RPC URL).",
)
@click.option(
    "--contract",
    default=None,
    help="The BatchAnchor's address [default: the one the bundle's signed statement names].",
)
def evidence_verify(
    bundle: str, keys: tuple[str, ...], rpc_url: str | None, contract: str | None
) -> None:
    """Check a bundle offline (and with --chain, against the roots on chain); exit 1 and
    name every problem if anything fails."""
    import json
    from pathlib import Path

    from sidecar.core import bundles

    public_keys: dict[str, str] = {}
    for key in keys:
        public_keys.update(_key_set(key))
    try:
        document = json.loads(Path(bundle).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise X402Error(f"cannot read {bundle}: {exc}") from None
    verdict = bundles.verify_bundle(document, public_keys)
    if verdict.ok:
        click.echo(f"OK: {verdict.receipts} receipts in {verdict.batches} batches verify")
    for problem in verdict.problems:
        click.echo(f"FAIL: {problem}")
    chain_ok = rpc_url is None or _verify_on_chain(document, rpc_url, contract)
    if not (verdict.ok and chain_ok):
        sys.exit(1)


def _verify_on_chain(document: object, rpc_url: str, contract: str | None) -> bool:
    """Each receipt's proof against the root on chain; prints what fails, `[reason]` first."""
    from sidecar.core import bundles
    from sidecar.core.errors import AnchorError
    from sidecar.tools.anchoring import read_roots

    contract = contract or bundles.anchor_contract(document)
    if contract is None:
        raise X402Error("name the anchor contract: --contract ADDR (the bundle names none)")
    try:
        found = read_roots(rpc_url, contract, bundles.anchored_batches(document))
    except AnchorError as exc:
        click.echo(f"FAIL [{exc.reason}]: {exc}")
        return False
    problems = bundles.check_anchors(document, found.roots)
    for problem in problems:
        click.echo(f"FAIL [{problem.reason}]: {problem.message}")
    if not problems:
        batches = len(found.roots)
        click.echo(
            f"OK: every receipt proven against the roots of {batches} batches on chain "
            f"(BatchAnchor {found.contract} on {found.network})"
        )
    return not problems


@main.group()
def anchor() -> None:
    """The on-chain anchor of settlement batches (a BatchAnchor contract)."""


@anchor.command("deploy")
@click.option("--rpc", "rpc_url", required=True, help="The chain's JSON-RPC URL.")
@click.option(
    "--key-file",
    required=True,
    type=click.Path(dir_okay=False),
    help="The operator's hex private key (mode 0600): the only key that may anchor.",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True)
def anchor_deploy(rpc_url: str, key_file: str, timeout: float) -> None:
    """Deploy a BatchAnchor; print its address for config anchor_chain.contract."""
    from sidecar.tools.anchoring import deploy

    deployed = deploy(rpc_url, key_file, timeout)
    click.echo(
        f"BatchAnchor {deployed.address} on {deployed.network}, operator {deployed.operator}"
    )
    click.echo(
        "config: anchor_chain: {rpc_url: <this RPC>, contract: "
        f"{deployed.address}, key_file: {key_file}}}"
    )


def _key_set(key: str) -> dict[str, str]:
    """One --key: a public key, or a file holding one or a discovery document."""
    from pathlib import Path

    from sidecar.core.identity import parse_key_set

    try:
        return parse_key_set(Path(key).read_text() if Path(key).is_file() else key)
    except ValueError as exc:
        raise X402Error(f"--key {key[:60]}: no public key nor discovery document ({exc})") from None


@main.command()
@click.option(
    "--from-block",
    "first",
    type=click.IntRange(min=0),
    default=None,
    help="The first block to read [default: the last --blocks blocks].",
)
@click.option(
    "--blocks",
    type=click.IntRange(min=1),
    default=None,
    help="Without --from-block: how many recent blocks [default: durability.reconcile_blocks].",
)
@click.option("--rpc", "rpc_url", default="", help="JSON-RPC URL [default: chain_rpc_url].")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per transfer, then totals.")
@config_option
@redis_option
def reconcile(
    first: int | None,
    blocks: int | None,
    rpc_url: str,
    as_json: bool,
    config_path: str | None,
    redis_url: str | None,
) -> None:
    """Credit top-ups the ledger lost, from the chain's transfers to pay_to."""
    import dataclasses
    import json

    from sidecar.server import wiring

    async def op(ledger: Ledger, settings: Settings) -> dict[str, int]:
        reconciler, chain = wiring.reconciler(settings, ledger, rpc_url)
        try:
            window = blocks or settings.durability_config().reconcile_blocks
            report = await reconciler.run(first, window)
        finally:
            await chain.close()
        for transfer in report.transfers:
            if as_json:
                click.echo(json.dumps(dataclasses.asdict(transfer)))
            else:
                who = f" payer {transfer.payer}" if transfer.payer else ""
                click.echo(
                    f"{transfer.outcome:9} {transfer.kind or '-':5} {transfer.transaction} "
                    f"from {transfer.sender} {transfer.value} {transfer.asset}{who}"
                )
        return report.summary()

    summary = ledger_call(redis_url, config_path, op)
    click.echo(json.dumps(summary) if as_json else " ".join(f"{k}={v}" for k, v in summary.items()))
