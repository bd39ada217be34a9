"""The chain anchors settlement batches: each batch's Merkle root, published from the
operator's key to the project's BatchAnchor contract (`contracts/BatchAnchor.sol`, compiled
by `sidecar/tools/contracts.py` into `contracts/BatchAnchor.json`, shipped as package data:
nothing here needs a compiler).

The contract keeps `roots(key)` (key: `core.batches.anchor_key(batch_id)`), written once
by its operator; a second anchor with the same root is a no-op, with another it reverts.
`ChainSink` is an `AnchorSink` (ledger/settlement.py): it reads `roots(key)` first, so a
batch already on chain (a re-run after a crash, a restarted sidecar) sends nothing.
`AnchorContract.root_of` is what `x402 evidence verify --chain` reads.

Web3 (the `evm` extra) over JSON-RPC; no message ever carries the RPC URL (a provider's URL
holds its API key).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from typing import Any

import aiohttp
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception

from sidecar.core.batches import anchor_key
from sidecar.core.errors import AnchorError

ZERO = bytes(32)
# What a failed RPC call may raise: the transport's errors and web3's own.
RPC_ERRORS = (Web3Exception, aiohttp.ClientError, OSError, TimeoutError, ValueError)


def artifact_text() -> str:
    """The committed compiler output, as `sidecar/tools/contracts.py` renders it."""
    return files("sidecar.ledger").joinpath("contracts/BatchAnchor.json").read_text("utf-8")


@cache
def artifact() -> dict[str, Any]:
    """BatchAnchor's ABI, creation and runtime code."""
    loaded: dict[str, Any] = json.loads(artifact_text())
    return loaded


Web3 = AsyncWeb3[AsyncHTTPProvider]


def connect(rpc_url: str, timeout: float = 30.0) -> Web3:
    """An async web3 on `rpc_url` that fails fast (the settle worker retries, not web3)."""
    provider = AsyncHTTPProvider(
        rpc_url,
        request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout)},
        exception_retry_configuration=None,
    )
    return AsyncWeb3(provider)


def _unreachable(what: str, exc: BaseException) -> AnchorError:
    return AnchorError(
        "chain_unavailable", f"{what}: the chain did not answer ({type(exc).__name__})"
    )


class AnchorContract:
    """The BatchAnchor at `address` on the chain behind `w3`."""

    def __init__(self, w3: Web3, address: str, timeout: float = 60.0) -> None:
        digits = address.removeprefix("0x")
        mixed = digits not in (digits.lower(), digits.upper())  # EIP-55: then a checksum
        if not AsyncWeb3.is_address(address) or (
            mixed and not AsyncWeb3.is_checksum_address(address)
        ):
            raise AnchorError(
                "not_anchor_contract",
                f"{address!r} is not an EVM address (or its checksum is wrong)",
            )
        self.w3 = w3
        self.address = AsyncWeb3.to_checksum_address(address)
        self.timeout = timeout  # how long a sent anchor may take to be mined
        self.contract: AsyncContract = w3.eth.contract(self.address, abi=artifact()["abi"])

    async def close(self) -> None:
        await self.w3.provider.disconnect()

    async def network(self) -> str:
        """The chain's CAIP-2 id (eip155:<chain id>)."""
        try:
            return f"eip155:{await self.w3.eth.chain_id}"
        except RPC_ERRORS as exc:
            raise _unreachable("reading the chain id", exc) from None

    async def check_code(self) -> None:
        """The code at the address is the project's BatchAnchor, byte for byte: so its
        roots are write-once, whoever deployed it."""
        try:
            code = bytes(await self.w3.eth.get_code(self.address))
        except RPC_ERRORS as exc:
            raise _unreachable(f"reading the code at {self.address}", exc) from None
        if code != bytes.fromhex(artifact()["deployedBytecode"].removeprefix("0x")):
            what = "no contract" if not code else "another contract"
            raise AnchorError(
                "not_anchor_contract",
                f"{self.address} holds {what}, not the x402 BatchAnchor (deploy one with "
                "x402 anchor deploy)",
            )

    async def root_of(self, batch: str) -> bytes | None:
        """The Merkle root anchored for batch id `batch`, or None if it is not anchored."""
        try:
            root = await self.contract.functions.roots(anchor_key(batch)).call()
        except RPC_ERRORS as exc:
            raise _unreachable(f"reading batch {batch}'s root", exc) from None
        return None if bytes(root) == ZERO else bytes(root)

    async def publish(self, batch: str, root: bytes, operator: LocalAccount) -> bool:
        """Anchor `root` for `batch` from the operator's key: False (nothing sent) if the
        chain has it already; AnchorError if it holds another root or the anchor fails."""
        known = await self.root_of(batch)
        if known == root:
            return False
        if known is not None:
            raise AnchorError(
                "anchor_conflict",
                f"batch {batch}: the chain holds root {known.hex()}, not {root.hex()}",
            )
        call = self.contract.functions.anchor(anchor_key(batch), root)
        try:
            nonce = await self.w3.eth.get_transaction_count(operator.address, "pending")
            tx = await call.build_transaction({"from": operator.address, "nonce": nonce})
            signed = operator.sign_transaction(tx)  # type: ignore[arg-type]
            sent = await self.w3.eth.send_raw_transaction(signed.raw_transaction)
            mined = await self.w3.eth.wait_for_transaction_receipt(sent, self.timeout)
        except ContractLogicError as exc:
            raise AnchorError("anchor_reverted", f"batch {batch}: anchor reverts ({exc})") from None
        except TimeExhausted:
            # It may still be mined: the retry reads roots() first and sends nothing then.
            raise AnchorError(
                "chain_unavailable", f"batch {batch}: anchor not mined in {self.timeout:g}s"
            ) from None
        except RPC_ERRORS as exc:
            raise _unreachable(f"anchoring batch {batch}", exc) from None
        if mined["status"] != 1:
            raise AnchorError(
                "anchor_reverted", f"batch {batch}: anchor transaction {sent.hex()} reverted"
            )
        return True


async def deploy(w3: Web3, operator: LocalAccount, wait: float = 60.0) -> str:
    """Deploy a BatchAnchor whose operator is `operator`; its address (mined within `wait`
    seconds)."""
    compiled = artifact()
    factory = w3.eth.contract(abi=compiled["abi"], bytecode=compiled["bytecode"])
    try:
        nonce = await w3.eth.get_transaction_count(operator.address, "pending")
        tx = await factory.constructor().build_transaction(
            {"from": operator.address, "nonce": nonce}
        )
        signed = operator.sign_transaction(tx)
        sent = await w3.eth.send_raw_transaction(signed.raw_transaction)
        mined = await w3.eth.wait_for_transaction_receipt(sent, wait)
    except TimeExhausted:
        raise AnchorError("chain_unavailable", f"deployment not mined in {wait:g}s") from None
    except RPC_ERRORS as exc:
        raise _unreachable("deploying BatchAnchor", exc) from None
    address = mined["contractAddress"]
    if mined["status"] != 1 or address is None:
        raise AnchorError("anchor_reverted", f"deployment {sent.hex()} failed")
    return str(address)


class ChainSink:
    """The on-chain anchor sink: one `anchor` transaction per batch not yet on chain.

    The code at the address is checked once (the first anchor), so a wrong address never
    takes a manifest; any failure is an AnchorError (a SettlementError), and the batch's
    claim stays for a retry."""

    name = "chain"

    def __init__(self, contract: AnchorContract, operator_key: str) -> None:
        self.contract = contract
        self.operator: LocalAccount = Account.from_key(operator_key)
        self._checked = False

    async def anchor(self, manifest: Mapping[str, Any]) -> bool:
        if not self._checked:
            await self.contract.check_code()
            await self._check_operator()
            self._checked = True
        root = bytes.fromhex(str(manifest["merkle_root"]))
        return await self.contract.publish(str(manifest["batch_id"]), root, self.operator)

    async def _check_operator(self) -> None:
        try:
            operator = await self.contract.contract.functions.operator().call()
        except RPC_ERRORS as exc:
            raise _unreachable("reading the anchor's operator", exc) from None
        if operator != self.operator.address:
            raise AnchorError(
                "not_operator",
                f"the anchor contract {self.contract.address} takes roots from {operator}, "
                f"not from this key's {self.operator.address}",
            )

    async def close(self) -> None:
        await self.contract.close()
