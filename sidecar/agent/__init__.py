"""The agent SDK: pay x402-priced HTTP APIs from Python.

    from sidecar.agent import Wallet, X402Auth

    wallet = Wallet.from_env(max_per_request="1", budget="10")
    with httpx.Client(auth=X402Auth(wallet)) as http:
        http.get("https://api.example/priced")  # 402 → signed proof → 200 + receipt

This package and `sidecar.core` are all that `pip install x402-sidecar` brings: no gRPC,
no Redis, no Envoy. It imports only `sidecar.core`.
"""

from sidecar.agent.auth import Discovery, Receipt, X402Auth, receipt_of
from sidecar.agent.channel import ChannelAuth, PaymentChannel
from sidecar.agent.evm import EvmKey
from sidecar.agent.wallet import Wallet
from sidecar.core.errors import (
    AssetNotAllowed,
    BudgetExceeded,
    ChannelExhausted,
    GuardRefused,
    InvalidReceipt,
    MaxAmountExceeded,
    PayeeNotAllowed,
)
from sidecar.core.identity import Identity

__all__ = [
    "AssetNotAllowed",
    "BudgetExceeded",
    "ChannelAuth",
    "ChannelExhausted",
    "Discovery",
    "EvmKey",
    "GuardRefused",
    "Identity",
    "InvalidReceipt",
    "MaxAmountExceeded",
    "PayeeNotAllowed",
    "PaymentChannel",
    "Receipt",
    "Wallet",
    "X402Auth",
    "receipt_of",
]
