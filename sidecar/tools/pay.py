"""`x402 pay URL`: one curl-like HTTP request that pays if the gateway asks for it; and
`x402 topup URL`: buy prepaid credit there.

The response body goes to stdout untouched; what was paid, the receipt and the balance
left go to stderr, so `x402 pay URL | jq` works.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from sidecar.agent.auth import TOPUP_REASONS, X402Auth
from sidecar.agent.discovery import origin_of
from sidecar.agent.outcomes import refusal_of
from sidecar.agent.receipts import receipt_of, refusal
from sidecar.agent.topup import topup
from sidecar.agent.wallet import Wallet
from sidecar.core.errors import PaymentOutcomeUnknown, ReceiptWarning, X402Error


@dataclass
class PayRequest:
    url: str
    method: str | None = None  # default: GET, or POST with data (as curl)
    headers: Sequence[str] = ()  # "Name: value"
    data: str | None = None  # "@file" reads a file, "@-" stdin
    max_amount: str | None = None
    assets: Sequence[str] = ()
    payees: Sequence[str] = ()
    wallet: str | None = None  # key file; default X402_WALLET / X402_WALLET_FILE
    evm_key: str | None = None  # EVM key file; default X402_EVM_KEY / X402_EVM_KEY_FILE
    direct: bool = True
    strict: bool = False
    timeout: float = 30.0


@dataclass
class TopupRequest:
    url: str
    amount: str  # a decimal in the gateway's top-up asset
    wallet: str | None = None  # the Ed25519 key file credited
    evm_key: str | None = None  # the EVM key file that pays
    assets: Sequence[str] = ()
    payees: Sequence[str] = ()
    strict: bool = False
    timeout: float = 120.0


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip():
            raise X402Error(f"header {value!r} is not 'Name: value'")
        headers[name.strip()] = text.strip()
    return headers


def read_data(data: str | None, stdin: IO[bytes]) -> bytes | None:
    if data is None:
        return None
    if data == "@-":
        return stdin.read()
    if data.startswith("@"):
        try:
            return Path(data[1:]).read_bytes()
        except OSError as exc:
            raise X402Error(f"cannot read {data[1:]}: {exc.strerror}") from None
    return data.encode()


def run(
    req: PayRequest,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[bytes] | None = None,
) -> int:
    """Exit status: 0 for a response below 400, 1 otherwise (the body is printed anyway)."""
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr
    wallet = Wallet.load(
        req.wallet,
        evm_key_file=req.evm_key,
        max_amount=req.max_amount,
        assets=req.assets or None,
        payees=req.payees or None,
    )
    body = read_data(req.data, stdin or sys.stdin.buffer)
    method = (req.method or ("POST" if body is not None else "GET")).upper()
    auth = X402Auth(wallet, direct=req.direct, strict=req.strict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReceiptWarning)
        try:
            with httpx.Client(auth=auth, timeout=req.timeout) as client:
                response = client.request(
                    method, req.url, headers=parse_headers(req.headers), content=body
                )
        except PaymentOutcomeUnknown as exc:
            raise X402Error(unknown_outcome(exc, method, req.url)) from None
        except httpx.InvalidURL as exc:
            raise X402Error(f"invalid URL {req.url!r}: {exc}") from None
        except httpx.HTTPError as exc:
            raise X402Error(f"{method} {req.url}: {exc.__class__.__name__}: {exc}") from None
    out.write(response.content)
    out.flush()
    for warning in caught:
        print(f"warning: {warning.message}", file=err)
    return report(response, err, wallet)


def run_topup(
    req: TopupRequest, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    """Buy the credit; what was credited, the balance, the transaction and the receipt on
    stdout, a receipt's warning on stderr. Exit status 0 (a refusal raises X402Error)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    wallet = Wallet.load(
        req.wallet, evm_key_file=req.evm_key, assets=req.assets or None, payees=req.payees or None
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReceiptWarning)
        try:
            done = topup(
                req.url, wallet, req.amount, strict=req.strict, request_timeout=req.timeout
            )
        except httpx.HTTPError as exc:
            raise X402Error(f"top-up at {req.url}: {exc.__class__.__name__}: {exc}") from None
    for warning in caught:
        print(f"warning: {warning.message}", file=err)
    check = "verified" if done.verified else "NOT VERIFIED"
    print(f"credited {done.credited} {done.asset} to {done.payer}", file=out)
    print(f"balance {done.balance} {done.asset}", file=out)
    print(f"transaction {done.transaction}", file=out)
    print(f"receipt {done.receipt_id} ({check})", file=out)
    return 0


def unknown_outcome(exc: PaymentOutcomeUnknown, method: str, url: str) -> str:
    """What a user can do when a paid answer never came: the same proof, re-sent, is
    charged at most once, and a spent one is answered `nonce_reused` with its receipt."""
    facts = exc.payment
    cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "an error"
    resend = " ".join(f"-H '{name}: {value}'" for name, value in exc.resend_headers.items())
    return (
        f"{method} {url}: {cause} after the payment was sent: {facts.get('amount', '?')} "
        f"{facts.get('asset', '')} to {facts.get('payee', '?')} (nonce {facts.get('nonce', '?')})"
        " may have been charged. Re-sending the same proof is charged at most once (if it "
        "was, the answer is 402 nonce_reused with its receipt id; a plain re-send pays "
        f"again): x402 pay -X {method} {resend} {url}"
    )


def report(response: httpx.Response, err: IO[str], wallet: Wallet | None = None) -> int:
    receipt = receipt_of(response)
    status = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    if receipt is not None:
        check = "verified" if receipt.verified else "NOT VERIFIED"
        # A prepaid receipt says the ledger balance left; an `exact` one, the transfer.
        transaction = receipt.fields.get("transaction")
        last = (
            f"transaction {transaction}"
            if isinstance(transaction, str) and transaction and not receipt.balance
            else f"balance {receipt.balance} {receipt.asset}"
        )
        print(
            f"{status} · paid {receipt.amount} {receipt.asset} to {receipt.payee}\n"
            f"receipt {receipt.receipt_id} ({check}, {receipt.resource})\n{last}",
            file=err,
        )
    elif response.status_code < 400:
        print(f"{status} · nothing to pay", file=err)
    if response.status_code < 400:
        return 0
    reason = refusal(response) or f"http_{response.status_code}"
    message = _message(response)
    print(f"error: {status}: {reason}{': ' + message if message else ''}", file=err)
    refused = refusal_of(response)
    next_step = getattr(refused, "next_step", None)
    if wallet is not None and wallet.evm is not None and reason in TOPUP_REASONS:
        next_step = (
            f"buy credit with this wallet's EVM key ({wallet.evm.address}): x402 topup "
            f"--amount AMOUNT {origin_of(response.request.url)}"
        )
    if next_step:
        print(f"next: {next_step}", file=err)
    return 1


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(body, dict):
        return ""
    message = str(body.get("message", ""))
    if "balance" in body:
        message += f" (balance {body['balance']})"
    return message
