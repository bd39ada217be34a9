"""The chain anchors settlement batches: a BatchAnchor deployed on anvil with `x402 anchor
deploy`, a real `x402 settle` publishing each batch's root from the operator's key, and
`x402 evidence verify --chain` proving receipts against the roots on chain, refusing a
tampered receipt and a receipt of an unanchored batch, each for a named reason."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.types import TxParams

from sidecar.core.batches import anchor_key
from sidecar.core.errors import AnchorError, ConfigError
from sidecar.ledger import anchors, settlement
from sidecar.ledger.accounts import Ledger
from sidecar.server import wiring
from sidecar.server.admin import start_facilities
from sidecar.server.anchor_settings import AnchorChain
from sidecar.server.config import Settings
from sidecar.tools.chain import AnvilChain, DevAccount
from sidecar.tools.contracts import render
from sidecar.tools.stack import Stack, free_port
from tests.support.cli import Run, x402
from tests.support.payers import payers_with_receipts
from tests.support.settlement import settle


def operator_of(chain: AnvilChain) -> DevAccount:
    return chain.accounts[-1]


@dataclass
class Anchored:
    contract: str
    config: Path  # the stack's config with anchor_chain
    payer: str
    bundle: dict[str, Any]
    key: str  # the gateway's public key


def write_key(path: Path, key: str, mode: int = 0o600) -> Path:
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


def with_anchor(stack: Stack, path: Path, anchor_chain: dict[str, Any]) -> Path:
    config = read_yaml(stack.config_path)
    path.write_text(yaml.safe_dump({**config, "anchor_chain": anchor_chain}))
    return path


async def export(config: Path, out: Path, payer: str) -> dict[str, Any]:
    run = await x402(
        "evidence", "export", "--payer", payer, "--out", str(out), "--config", str(config)
    )
    assert run.code == 0, run.err
    return read_json(out)


def read_yaml(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def read_json(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document))


async def verify(bundle: dict[str, Any], path: Path, key: str, *chain: str) -> Run:
    write_json(path, bundle)
    return await x402("evidence", "verify", str(path), "--key", key, *chain)


@pytest.fixture(scope="module")
async def anchored(
    stack: Stack, ledger: Ledger, chain: AnvilChain, tmp_path_factory: pytest.TempPathFactory
) -> Anchored:
    """A BatchAnchor deployed through the CLI; 7 paid requests settled in batches of 3 with
    the chain sink configured; the payer's bundle exported (it names the contract)."""
    work = tmp_path_factory.mktemp("anchor")
    key_file = write_key(work / "operator.key", operator_of(chain).key)
    run = await x402("anchor", "deploy", "--rpc", chain.rpc_url, "--key-file", str(key_file))
    assert run.code == 0, run.err
    found = re.search(r"BatchAnchor (0x[0-9a-fA-F]{40}) on eip155:31337", run.out)
    assert found, run.out
    contract = found.group(1)
    config = with_anchor(
        stack,
        work / "x402.yaml",
        {"rpc_url": chain.rpc_url, "contract": contract, "key_file": str(key_file)},
    )
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        [(wallet, _receipts)] = await payers_with_receipts(ledger, client, stack, [7])
    run = await x402(
        "settle", "--config", str(config), "--flush", "--batch-size", "3",
        "--anchor-file", str(work / "anchors.jsonl"),
    )  # fmt: skip
    assert run.code == 0, run.err
    bundle = await export(config, work / "bundle.json", wallet.public_key)
    assert [m["count"] for m in bundle["batches"]] == [3, 3, 1]
    key = stack.gateway_identity.public_key
    return Anchored(contract, config, wallet.public_key, bundle, key)


def test_the_committed_contract_is_what_solc_compiles() -> None:
    """The runtime ships BatchAnchor.json; compiling BatchAnchor.sol again with the pinned
    solc-js and settings gives the same bytes."""
    assert render() == anchors.artifact_text()


async def test_each_batch_root_is_on_chain(anchored: Anchored, chain: AnvilChain) -> None:
    address = Web3.to_checksum_address(anchored.contract)
    contract = chain.w3.eth.contract(address=address, abi=anchors.artifact()["abi"])
    for manifest in anchored.bundle["batches"]:
        root = contract.functions.roots(anchor_key(manifest["batch_id"])).call()
        assert root.hex().removeprefix("0x") == manifest["merkle_root"]
    assert contract.functions.operator().call() == operator_of(chain).address
    assert anchored.bundle["statement"]["anchor_contract"] == anchored.contract


async def test_a_receipt_is_proven_against_the_chain(
    anchored: Anchored, chain: AnvilChain, tmp_path: Path
) -> None:
    run = await verify(anchored.bundle, tmp_path / "b.json", anchored.key, "--chain", chain.rpc_url)

    assert run.code == 0, run.out + run.err
    assert "Unclosed" not in run.err  # the chain's connections are closed
    assert "OK: 7 receipts in 3 batches verify" in run.out
    assert (
        "OK: every receipt proven against the roots of 3 batches on chain "
        f"(BatchAnchor {anchored.contract} on eip155:31337)" in run.out
    )


async def test_a_tampered_receipt_fails_against_the_chain(
    anchored: Anchored, chain: AnvilChain, tmp_path: Path
) -> None:
    bundle = copy.deepcopy(anchored.bundle)
    item = bundle["receipts"][4]
    item["receipt"]["amount"] = "0.001"

    run = await verify(bundle, tmp_path / "b.json", anchored.key, "--chain", chain.rpc_url)

    rid, batch = item["receipt"]["receipt_id"], item["batch_id"]
    assert run.code == 1
    assert (
        f"FAIL [proof_mismatch]: receipt {rid}: Merkle proof does not lead to the root on "
        f"chain for batch {batch}" in run.out
    )
    assert run.out.count("[proof_mismatch]") == 1


async def test_a_receipt_of_an_unanchored_batch_fails(
    stack: Stack, ledger: Ledger, anchored: Anchored, chain: AnvilChain, tmp_path: Path
) -> None:
    """Settled without the chain sink (the stack's own config): the contract has no root
    for its batch, and verify names that reason."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        [(wallet, [receipt])] = await payers_with_receipts(ledger, client, stack, [1])
    run = await settle(stack, "--anchor-file", str(tmp_path / "anchors.jsonl"))
    assert run.code == 0, run.err
    bundle = await export(stack.config_path, tmp_path / "plain.json", wallet.public_key)
    assert "anchor_contract" not in bundle["statement"]

    run = await verify(
        bundle, tmp_path / "b.json", anchored.key, "--chain", chain.rpc_url,
        "--contract", anchored.contract,
    )  # fmt: skip

    assert run.code == 1
    assert "OK: 1 receipts in 1 batches verify" in run.out  # the signatures hold
    batch = bundle["batches"][0]["batch_id"]
    assert (
        f"FAIL [not_anchored]: receipt {receipt['receipt_id']}: its batch {batch} is not "
        "anchored on chain" in run.out
    )
    # Without --contract, a bundle that names none is a usage error.
    run = await verify(bundle, tmp_path / "b.json", anchored.key, "--chain", chain.rpc_url)
    assert run.code == 1 and "--contract" in run.err


async def test_an_address_that_is_not_the_anchor_is_refused(
    anchored: Anchored, chain: AnvilChain, tmp_path: Path
) -> None:
    run = await verify(
        anchored.bundle, tmp_path / "b.json", anchored.key, "--chain", chain.rpc_url,
        "--contract", chain.token,
    )  # fmt: skip
    assert run.code == 1
    assert f"FAIL [not_anchor_contract]: {chain.token} holds another contract" in run.out


async def test_anchoring_a_batch_again_is_a_no_op(anchored: Anchored, chain: AnvilChain) -> None:
    """A re-run after a crash, or a restarted sidecar (a new sink): the root is read first
    and nothing is sent; another root for the same batch is refused."""
    settings = Settings.load(anchored.config)
    sender = operator_of(chain).address
    manifest = anchored.bundle["batches"][0]
    before = chain.transaction_count(sender)
    for _restart in range(2):
        ledger = Ledger.from_url(settings.redis_url)
        sink = wiring.anchor_sinks(settings, ledger, "")[-1]
        try:
            assert await sink.anchor(manifest) is False
            with pytest.raises(AnchorError) as refused:
                await sink.anchor({**manifest, "merkle_root": "11" * 32})
            assert refused.value.reason == "anchor_conflict"
        finally:
            await sink.close()
            await ledger.close()
    assert chain.transaction_count(sender) == before


def test_the_contract_keeps_each_root_once_and_only_from_its_operator(
    anchored: Anchored, chain: AnvilChain
) -> None:
    address = Web3.to_checksum_address(anchored.contract)
    contract = chain.w3.eth.contract(address=address, abi=anchors.artifact()["abi"])
    key = anchor_key(anchored.bundle["batches"][0]["batch_id"])
    root = bytes.fromhex(anchored.bundle["batches"][0]["merkle_root"])
    operator: TxParams = {"from": operator_of(chain).address}
    assert contract.functions.anchor(key, root).call(operator) is False
    with pytest.raises(ContractLogicError):  # AlreadyAnchored
        contract.functions.anchor(key, b"\x11" * 32).call(operator)
    with pytest.raises(ContractLogicError):  # NotOperator
        contract.functions.anchor(b"\x22" * 32, root).call({"from": chain.deployer.address})


async def test_the_operator_key_file_must_be_private(
    anchored: Anchored, chain: AnvilChain, tmp_path: Path
) -> None:
    loose = write_key(tmp_path / "loose.key", operator_of(chain).key, 0o644)
    settings = Settings.load(anchored.config)
    chain_config = {**settings.anchor_chain, "key_file": str(loose)}
    loose_config = AnchorChain.from_mapping(chain_config)
    assert loose_config is not None
    with pytest.raises(ConfigError, match="chmod 600"):
        wiring.chain_sink(loose_config)
    # A mixed-case address whose checksum is wrong is a config error too, before any use.
    wrong = anchored.contract[:2] + anchored.contract[2:].swapcase()
    key_file = write_key(tmp_path / "operator.key", operator_of(chain).key)
    mistyped = AnchorChain.from_mapping(
        {**chain_config, "contract": wrong, "key_file": str(key_file)}
    )
    assert mistyped is not None
    with pytest.raises(ConfigError, match=r"anchor_chain\.contract: .* checksum is wrong"):
        wiring.chain_sink(mistyped)
    run = await x402("anchor", "deploy", "--rpc", chain.rpc_url, "--key-file", str(loose))
    assert run.code == 1 and "chmod 600" in run.err
    assert Account.from_key(operator_of(chain).key).address not in run.err + run.out


async def test_a_chain_that_does_not_answer_holds_the_batch_back(
    stack: Stack, ledger: Ledger, anchored: Anchored, chain: AnvilChain, tmp_path: Path
) -> None:
    """Fail closed: with the chain down the batch is not committed (the pass exits 1, the
    receipt stays unsettled, nothing names the RPC URL); once the chain answers, the next
    pass anchors and commits it."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        [(wallet, [receipt])] = await payers_with_receipts(ledger, client, stack, [1])
    settings = read_yaml(anchored.config)
    dead_rpc = f"http://127.0.0.1:{free_port()}/v2/SECRET-API-KEY"
    down = with_anchor(
        stack, tmp_path / "down.yaml", {**settings["anchor_chain"], "rpc_url": dead_rpc}
    )
    anchor_file = str(tmp_path / "anchors.jsonl")

    run = await x402(
        "settle", "--config", str(down), "--flush", "--lease", "0.1", "--anchor-file", anchor_file
    )

    assert run.code == 1
    assert "1 failed" in run.err and "SECRET" not in run.out + run.err
    out = tmp_path / "bundle.json"
    run = await x402(
        "evidence", "export", "--receipt", receipt["receipt_id"], "--out", str(out),
        "--config", str(anchored.config),
    )  # fmt: skip
    assert run.code == 1 and "is in no settled batch" in run.err

    run = await x402(
        "settle", "--config", str(anchored.config), "--flush", "--anchor-file", anchor_file
    )
    assert run.code == 0, run.err
    bundle = await export(anchored.config, out, wallet.public_key)
    run = await verify(bundle, tmp_path / "b.json", anchored.key, "--chain", chain.rpc_url)
    assert run.code == 0, run.out


async def test_the_sidecars_own_settle_loop_anchors_on_chain(
    stack: Stack, ledger: Ledger, anchored: Anchored, chain: AnvilChain, tmp_path: Path
) -> None:
    """settle_interval_seconds with anchor_chain: worker 0's loop (here in process) commits
    each batch once its root is on chain, and lets go of the chain when it stops."""
    settings = replace(
        Settings.load(anchored.config),
        settle_interval_seconds=1,
        settle_max_age_seconds=0,
        listen_admin="",
        anchor_file=str(tmp_path / "anchors.jsonl"),
    )
    facilities = await start_facilities(settings, ledger, settings.gateway())
    try:
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
            [(wallet, _receipts)] = await payers_with_receipts(ledger, client, stack, [2])
        # With max age 0 a receipt that lands while the first is anchoring is its own batch.
        for _ in range(100):
            manifests = await settlement.payer_batches(ledger, wallet.public_key)
            if sum(int(m["count"]) for m in manifests) == 2:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the in-sidecar settle loop did not settle both receipts")
    finally:
        await facilities.close(2)
    address = Web3.to_checksum_address(anchored.contract)
    contract = chain.w3.eth.contract(address=address, abi=anchors.artifact()["abi"])
    for manifest in manifests:
        root = contract.functions.roots(anchor_key(manifest["batch_id"])).call()
        assert root.hex().removeprefix("0x") == manifest["merkle_root"]
