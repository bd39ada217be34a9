"""The agent SDK: pay x402-priced HTTP APIs from Python.

    from sidecar.agent import Wallet, X402Auth

    wallet = Wallet.from_env(max_amount="1", budget="10")
    with httpx.Client(auth=X402Auth(wallet)) as http:
        http.get("https://api.example/priced")  # 402 → signed proof → 200 + receipt

A wallet may also hold an EVM key (the `evm` extra): X402Auth then pays the x402 `exact`
scheme where that is what a route offers, and `auto_topup=` buys prepaid credit with it.

This package and `sidecar.core` are all that `pip install x402-sidecar` brings: no gRPC,
no Redis, no Envoy. It imports only `sidecar.core`.
"""

from sidecar.agent.auth import TOPUP_EXTENSION, Discovery, Receipt, X402Auth, receipt_of
from sidecar.agent.channel import ChannelAuth, PaymentChannel
from sidecar.agent.evm import EvmKey
from sidecar.agent.exact import TopUp
from sidecar.agent.outcomes import REFUSAL_EXTENSION, raise_for_payment, refusal_of
from sidecar.agent.retries import AsyncRetryPaid, Retrying, RetryPaid
from sidecar.agent.topup import atopup, topup
from sidecar.agent.wallet import Wallet
from sidecar.core.errors import (
    AssetNotAllowed,
    BudgetExceeded,
    ChannelExhausted,
    ChannelRequestFailed,
    GuardRefused,
    InsufficientFunds,
    InvalidChallenge,
    InvalidReceipt,
    MaxAmountExceeded,
    PayeeNotAllowed,
    PaymentError,
    PaymentOutcomeUnknown,
    SettlementPending,
    TopUpFailed,
    UnknownPayer,
)
from sidecar.core.identity import Identity

__all__ = [
    "REFUSAL_EXTENSION",
    "TOPUP_EXTENSION",
    "AssetNotAllowed",
    "AsyncRetryPaid",
    "BudgetExceeded",
    "ChannelAuth",
    "ChannelExhausted",
    "ChannelRequestFailed",
    "Discovery",
    "EvmKey",
    "GuardRefused",
    "Identity",
    "InsufficientFunds",
    "InvalidChallenge",
    "InvalidReceipt",
    "MaxAmountExceeded",
    "PayeeNotAllowed",
    "PaymentChannel",
    "PaymentError",
    "PaymentOutcomeUnknown",
    "Receipt",
    "RetryPaid",
    "Retrying",
    "SettlementPending",
    "TopUp",
    "TopUpFailed",
    "UnknownPayer",
    "Wallet",
    "X402Auth",
    "atopup",
    "raise_for_payment",
    "receipt_of",
    "refusal_of",
    "topup",
]
