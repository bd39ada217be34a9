"""The operator's and the verifier's side of the chain anchor: `x402 anchor deploy` (a
BatchAnchor whose operator is the key given) and the roots `x402 evidence verify --chain`
checks a bundle against (ledger/anchors.py talks to the contract)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from eth_account import Account

from sidecar.core.identity import read_evm_key
from sidecar.ledger import anchors


@dataclass(frozen=True)
class Deployed:
    address: str
    network: str  # eip155:<chain id>
    operator: str  # the address that alone may anchor


def deploy(rpc_url: str, key_file: str, timeout: float = 60.0) -> Deployed:
    """Deploy a BatchAnchor from the key in `key_file` (mode 0600), its operator."""
    operator = Account.from_key(read_evm_key(key_file, "--key-file"))

    async def run() -> Deployed:
        w3 = anchors.connect(rpc_url, timeout)
        try:
            address = await anchors.deploy(w3, operator, timeout)
            contract = anchors.AnchorContract(w3, address)
            await contract.check_code()
            return Deployed(address, await contract.network(), operator.address)
        finally:
            await w3.provider.disconnect()

    return asyncio.run(run())


@dataclass(frozen=True)
class ChainRoots:
    network: str
    contract: str
    roots: dict[str, bytes | None]  # batch id → its root on chain (None: not anchored)


def read_roots(rpc_url: str, contract: str, batches: Sequence[str]) -> ChainRoots:
    """The roots the BatchAnchor at `contract` holds for `batches`, once its code is checked
    to be the project's (AnchorError otherwise, or when the chain does not answer)."""

    async def run() -> ChainRoots:
        anchor = anchors.AnchorContract(anchors.connect(rpc_url), contract)
        try:
            await anchor.check_code()
            roots = {batch: await anchor.root_of(batch) for batch in batches}
            return ChainRoots(await anchor.network(), anchor.address, roots)
        finally:
            await anchor.close()

    return asyncio.run(run())
