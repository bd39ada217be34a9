"""The on-chain half of the real stack, shared by `x402 demo` and the `exact` and top-up
tests: roles on the anvil chain with Circle's FiatTokenV2_2 (sidecar.tools.chain), the
official facilitator behind `x402 facilitator serve`, the sidecar config keys that offer
`exact` for USDF through them, and an unmodified official x402 client for the local token.
Needs the `evm` extra."""

from __future__ import annotations

import base64
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from x402 import x402Client
from x402.client_base import SpendControlAsset, SpendControls
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentPayload

from sidecar.core.identity import write_secret
from sidecar.tools.chain import AnvilChain, DevAccount
from sidecar.tools.stack import LOOPBACK, Process, free_port, wait_http


def facilitator_account(chain: AnvilChain) -> DevAccount:
    return chain.spare[0]


def operator(chain: AnvilChain) -> DevAccount:
    return chain.spare[1]


def payers(chain: AnvilChain) -> list[DevAccount]:
    return chain.spare[2:]


@dataclass
class FacilitatorProcess:
    """`x402 facilitator serve` on a fixed port, so it can be killed and started again."""

    chain: AnvilChain
    workdir: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None
    bearer_file: Path | None = None  # --require-bearer-file: 401 without this token
    verify_processes: int = 0  # --verify-processes

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> FacilitatorProcess:
        key_file = self.workdir / "facilitator.key"
        key_file.unlink(missing_ok=True)  # a restart writes it again
        write_secret(key_file, facilitator_account(self.chain).key + "\n")
        argv = [sys.executable, "-m", "sidecar.tools.cli", "facilitator", "serve"]
        argv += ["--rpc-url", self.chain.rpc_url]
        argv += ["--key-file", str(key_file), "--listen", f"{LOOPBACK}:{self.port}"]
        argv += ["--network", self.chain.network]
        if self.bearer_file is not None:
            argv += ["--require-bearer-file", str(self.bearer_file)]
        if self.verify_processes:
            argv += ["--verify-processes", str(self.verify_processes)]
        self.process = Process("facilitator", argv, self.workdir / "facilitator.log").start()
        wait_http(f"{self.url}/health", timeout=30, process=self.process)
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def exact_settings(
    chain: AnvilChain, facilitator: FacilitatorProcess, **more: Any
) -> dict[str, Any]:
    """The sidecar config keys that offer `exact` for USDF with the chain's USDC."""
    return {
        "onchain": {
            "USDF": {
                "network": chain.network,
                "token": chain.token,
                "name": chain.token_name,
                "version": chain.token_version,
                "decimals": chain.decimals,
            }
        },
        "facilitator_url": facilitator.url,
        "pay_to": operator(chain).address,
        "chain_rpc_url": chain.rpc_url,
        "exact_max_timeout_seconds": 120,
        **more,
    }


def official_client(chain: AnvilChain, payer: DevAccount, cap: int) -> x402Client:
    """An unmodified official x402 client for the local token: `exact` on this chain, spend
    controls that allow our USDC (not a token it knows) up to `cap` atomic units."""
    return exact_client(chain.network, chain.token, payer.key, cap)


def exact_client(network: str, token: str, key: str, cap: int) -> x402Client:
    """The same from plain facts (what `x402 demo --info` writes): the official client
    paying `exact` on `network` from the hex private `key`, `token` allowed up to `cap`."""
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(key)), network)
    allowed = SpendControlAsset(network=network, asset=token, max_amount_per_payment=str(cap))
    client.set_spend_controls(SpendControls(allowed_assets=[allowed]))
    return client


def upto_client(network: str, token: str, key: str, cap: int, rpc_url: str = "") -> x402Client:
    """The official client paying `upto` (only) on `network` from the hex private `key`, a
    maximum of up to `cap` atomic units of `token`. With `rpc_url` its signer reads the
    chain, so it signs the eip2612GasSponsoring permit when the payer has no Permit2
    approval (the 402 declares the extension)."""
    account = Account.from_key(key)
    signer = EthAccountSignerWithRPC(account, rpc_url) if rpc_url else EthAccountSigner(account)
    client = x402Client()
    client.register(network, UptoEvmClientScheme(signer))
    allowed = SpendControlAsset(network=network, asset=token, max_amount_per_payment=str(cap))
    client.set_spend_controls(SpendControls(allowed_assets=[allowed]))
    return client


def payment_signature(payload: PaymentPayload) -> str:
    """The PAYMENT-SIGNATURE header value the official HTTP clients send for `payload`."""
    return base64.b64encode(payload.model_dump_json(by_alias=True).encode()).decode()
