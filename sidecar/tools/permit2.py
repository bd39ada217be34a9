"""Permit2 and the x402 `upto` proxy on the test chain: the project's own test doubles
(`testchain/Permit2.sol`, `testchain/X402UptoPermit2Proxy.sol`, each documenting the
interface it implements), compiled with npm `solc` (solc-js) and placed at the canonical
addresses the official `x402` package uses with `anvil_setCode`. Neither Uniswap's Permit2
nor the x402 proxy's bytecode can be installed from the registries the project uses.

The runtime code ships as an artifact beside the sources (`python -m sidecar.tools.contracts
upto > sidecar/tools/testchain/UptoTestDoubles.json`, `make generate`), so a chain starts
without a compiler; a test compiles the sources again and compares.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from web3 import Web3
from web3.types import RPCEndpoint
from x402.mechanisms.evm.constants import PERMIT2_ADDRESS, X402_UPTO_PERMIT2_PROXY_ADDRESS

from sidecar.core.errors import X402Error

PERMIT2 = Web3.to_checksum_address(PERMIT2_ADDRESS)
UPTO_PROXY = Web3.to_checksum_address(X402_UPTO_PERMIT2_PROXY_ADDRESS)
SOURCES = ("Permit2.sol", "X402UptoPermit2Proxy.sol")
# Where each contract goes: (file:contract, canonical address).
PLACED = (
    ("Permit2.sol:Permit2", PERMIT2),
    ("X402UptoPermit2Proxy.sol:X402UptoPermit2Proxy", UPTO_PROXY),
)
SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    "evmVersion": "paris",
    "outputSelection": {"*": {"*": ["evm.deployedBytecode.object"]}},
}
APPROVE_ABI = [
    {
        "type": "function",
        "name": "approve",
        "inputs": [{"name": "spender", "type": "address"}, {"name": "amount", "type": "uint256"}],
        "outputs": [{"type": "bool"}],
        "stateMutability": "nonpayable",
    }
]
UNLIMITED = 2**256 - 1


ARTIFACT = "testchain/UptoTestDoubles.json"


def sources() -> dict[str, str]:
    folder = files("sidecar.tools").joinpath("testchain")
    return {name: folder.joinpath(name).read_text("utf-8") for name in SOURCES}


def runtime_code() -> dict[str, str]:
    """Each canonical address → the runtime code to place there (the committed artifact:
    the demo and the tests need no compiler; tests/test_upto.py checks it against solc)."""
    artifact = json.loads(files("sidecar.tools").joinpath(ARTIFACT).read_text("utf-8"))
    runtime: dict[str, str] = artifact["runtime"]
    return runtime


def install(w3: Web3) -> None:
    """Place Permit2 and the upto proxy at their canonical addresses on an anvil chain."""
    for address, code in runtime_code().items():
        w3.provider.make_request(RPCEndpoint("anvil_setCode"), [address, code])
        if (
            w3.eth.get_code(Web3.to_checksum_address(address)).hex().removeprefix("0x")
            != code[2:].lower()
        ):
            raise X402Error(f"anvil_setCode did not place the contract at {address}")


def approve(w3: Web3, token: str, owner: str) -> None:
    """`owner` lets Permit2 move its tokens: the one on-chain step a payer takes before
    paying `upto` without the gas-sponsoring extension. Sent as `owner` through anvil's
    impersonation (any address, dev account or not), given gas money if it has none."""
    address = Web3.to_checksum_address(owner)
    if w3.eth.get_balance(address) == 0:
        w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [address, hex(10**18)])
    w3.provider.make_request(RPCEndpoint("anvil_impersonateAccount"), [address])
    try:
        contract = w3.eth.contract(address=Web3.to_checksum_address(token), abi=APPROVE_ABI)
        sent = contract.functions.approve(PERMIT2, UNLIMITED).transact({"from": address})
        if w3.eth.wait_for_transaction_receipt(sent, timeout=10)["status"] != 1:
            raise X402Error("approve(Permit2) reverted")
    finally:
        w3.provider.make_request(RPCEndpoint("anvil_stopImpersonatingAccount"), [address])
