"""The on-chain half of the real stack, shared by the `exact` and top-up tests: anvil with
Circle's FiatTokenV2_2, the official facilitator behind `x402 facilitator serve`, and a
Stack configured to offer `exact` for USDF through them. Nothing is mocked."""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from x402 import x402Client
from x402.client_base import SpendControlAsset, SpendControls
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.schemas import PaymentPayload, PaymentRequired

from sidecar.tools.chain import Chain, DevAccount
from sidecar.tools.stack import LOOPBACK, Process, free_port, wait_http

X402 = str(Path(sys.executable).with_name("x402"))


def facilitator_account(chain: Chain) -> DevAccount:
    return chain.spare[0]


def operator(chain: Chain) -> DevAccount:
    return chain.spare[1]


def payers(chain: Chain) -> list[DevAccount]:
    return chain.spare[2:]


@dataclass
class Facilitator:
    """`x402 facilitator serve` on a fixed port, so it can be killed and started again."""

    chain: Chain
    workdir: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Facilitator:
        key_file = self.workdir / "facilitator.key"
        key_file.write_text(facilitator_account(self.chain).key + "\n")
        key_file.chmod(0o600)
        argv = [X402, "facilitator", "serve", "--rpc-url", self.chain.rpc_url]
        argv += ["--key-file", str(key_file), "--listen", f"{LOOPBACK}:{self.port}"]
        argv += ["--network", self.chain.network]
        self.process = Process("facilitator", argv, self.workdir / "facilitator.log").start()
        wait_http(f"{self.url}/health", timeout=30, process=self.process)
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def exact_settings(chain: Chain, facilitator: Facilitator, **more: Any) -> dict[str, Any]:
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


def official_client(chain: Chain, payer: DevAccount, cap: int) -> x402Client:
    """An unmodified official x402 client for the local token: `exact` on this chain, spend
    controls that allow our USDC (not a token it knows) up to `cap` atomic units."""
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(payer.key)), chain.network)
    allowed = SpendControlAsset(
        network=chain.network, asset=chain.token, max_amount_per_payment=str(cap)
    )
    client.set_spend_controls(SpendControls(allowed_assets=[allowed]))
    return client


def b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value))


def balances(chain: Chain, payer: str) -> tuple[int, int]:
    """The payer's and the operator's token balances."""
    return chain.balance_of(payer), chain.balance_of(operator(chain).address)


async def sign_exact(
    chain: Chain, http: httpx.AsyncClient, path: str, payer: DevAccount, cap: int,
    amount: int | None = None,
) -> tuple[str, PaymentPayload]:  # fmt: skip
    """What the official client sends for `path`'s 402: the PAYMENT-SIGNATURE value and
    the payload. `amount`: sign for another amount than the offer's (a refused payment)."""
    challenge = await http.get(path)
    assert challenge.status_code == 402
    required = PaymentRequired.model_validate(b64json(challenge.headers["payment-required"]))
    if amount is not None:
        required.accepts = [
            offer.model_copy(update={"amount": str(amount)}) for offer in required.accepts
        ]
    payload = await official_client(chain, payer, cap).create_payment_payload(required)
    assert isinstance(payload, PaymentPayload)
    encoded = base64.b64encode(payload.model_dump_json(by_alias=True).encode()).decode()
    return encoded, payload
