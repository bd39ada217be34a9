"""An agent's commands: keys, paying a request, buying credit, payment channels."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from sidecar.core.errors import X402Error
from sidecar.core.identity import Identity
from sidecar.tools.cli.base import (
    KEY_ARGUMENTS,
    admin_options,
    check_key,
    config_option,
    main,
    payers_call,
    redis_option,
)

if TYPE_CHECKING:
    from sidecar.agent.channel_open import Closed, Opened


@main.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    help="Where to write the private key (mode 0600; never overwritten).",
)
@click.option(
    "--evm",
    is_flag=True,
    help="An EVM (secp256k1) key instead: an agent's key for x402 `exact` and top-ups.",
)
def keygen(out: str, evm: bool) -> None:
    """Create an Ed25519 key (a gateway signing key or an agent wallet), or an EVM key."""
    from sidecar.agent.evm import EvmKey

    key = EvmKey.generate() if evm else Identity.generate()
    # Before writing: an EVM address needs the `evm` extra (ConfigError without it).
    shown = [f"address: {key.address}"] if isinstance(key, EvmKey) else [
        f"public key: {key.public_key}\n  as an agent's wallet, its payer id: x402 payer "
        f"register {key.public_key}\n  as a gateway's signing key, its payee id: {key.kid}"
    ]  # fmt: skip
    try:
        key.save(out)
    except FileExistsError:
        raise X402Error(f"{out} exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise X402Error(f"cannot write {out}: {exc.strerror}") from None
    for line in shown:
        click.echo(line)


@main.group()
def channel() -> None:
    """Open and close payment channels (a deposit locked for vouchered requests)."""


SELF_HELP = (
    "Self-serve: the agent itself, at the gateway URL given first, with a request signed "
    "by its wallet's key (--wallet), from its own prepaid balance; no operator."
)
WALLET_HELP = "With --self: the agent's key file [default: env X402_WALLET or X402_WALLET_FILE]."


@channel.command("open", context_settings=KEY_ARGUMENTS)
@click.argument("target", metavar="PAYER|URL")
@click.argument("deposit")
@click.option("--self", "self_serve", is_flag=True, help=SELF_HELP)
@click.option("--wallet", type=click.Path(dir_okay=False), default=None, help=WALLET_HELP)
@click.option("--asset", default=None, help="Asset code [default: the config's default].")
@click.option(
    "--ttl",
    type=click.IntRange(min=1),
    default=None,
    help="Seconds [default: 86400, or with --self the gateway's longest].",
)
@click.option("--id", "channel_id", default=None, help="Channel id [default: random].")
@redis_option
@config_option
@admin_options
def channel_open(
    target: str,
    deposit: str,
    self_serve: bool,
    wallet: str | None,
    asset: str | None,
    ttl: int | None,
    channel_id: str | None,
    redis_url: str | None,
    config_path: str | None,
) -> None:
    """Lock DEPOSIT (a decimal) from a payer's balance into a new channel: the operator's
    (PAYER, the ledger or admin API), or with --self the agent's own at the gateway URL."""
    if self_serve and (asset or channel_id):
        raise X402Error("--self opens in the gateway's asset under a random id: no --asset, --id")
    if wallet and not self_serve:
        raise X402Error("--wallet goes with --self (the operator names the PAYER instead)")
    if self_serve:
        opened = _self_open(target, deposit, wallet, ttl)
        click.echo(
            f"channel {opened.channel_id}\n"
            f"deposit {opened.deposit} {opened.asset}, open until {opened.expires_at} "
            f"(unix time)\nbalance left {opened.balance} {opened.asset}\n"
            f"receipt {opened.receipt.receipt_id} (verified)"
        )
        return
    check_key(target)
    opened_by_operator = payers_call(
        redis_url,
        config_path,
        lambda p: p.open_channel(target, deposit, asset, ttl or 86400, channel_id),
        channels=True,
    )
    click.echo(
        f"channel {opened_by_operator.channel_id}\n"
        f"deposit {opened_by_operator.deposit} {opened_by_operator.asset}, open until "
        f"{opened_by_operator.expires_at} (unix time)\n"
        f"balance left {opened_by_operator.balance} {opened_by_operator.asset}"
    )


def _self_open(url: str, deposit: str, wallet: str | None, ttl: int | None) -> Opened:
    import httpx

    from sidecar.agent.channel import PaymentChannel
    from sidecar.agent.wallet import Wallet

    try:
        channel = PaymentChannel.open(url, Wallet.load(wallet), deposit, ttl_seconds=ttl)
    except httpx.HTTPError as exc:
        raise X402Error(f"channel open at {url}: {exc.__class__.__name__}: {exc}") from None
    assert channel.opened is not None
    return channel.opened


def _self_close(url: str, channel_id: str, wallet: str | None) -> Closed:
    import httpx

    from sidecar.agent.channel import PaymentChannel
    from sidecar.agent.wallet import Wallet

    try:
        return PaymentChannel(Wallet.load(wallet), channel_id).close(url)
    except httpx.HTTPError as exc:
        raise X402Error(f"channel close at {url}: {exc.__class__.__name__}: {exc}") from None


@channel.command("close", context_settings=KEY_ARGUMENTS)
@click.argument("target", metavar="PAYER|URL")
@click.argument("channel_id")
@click.option("--self", "self_serve", is_flag=True, help=SELF_HELP)
@click.option("--wallet", type=click.Path(dir_okay=False), default=None, help=WALLET_HELP)
@redis_option
@config_option
@admin_options
def channel_close(
    target: str,
    channel_id: str,
    self_serve: bool,
    wallet: str | None,
    redis_url: str | None,
    config_path: str | None,
) -> None:
    """Refund what is left of the deposit; the final voucher goes to settlement."""
    if wallet and not self_serve:
        raise X402Error("--wallet goes with --self (the operator names the PAYER instead)")
    if self_serve:
        done = _self_close(target, channel_id, wallet)
        head = f"channel {channel_id} {'was already closed' if done.already_closed else 'closed'}"
        click.echo(
            f"{head}: spent {done.spent}, refunded {done.refund}; balance {done.balance} "
            f"{done.asset}\nclose receipt {done.receipt.receipt_id} (verified)"
        )
        return
    check_key(target)
    closed = payers_call(redis_url, config_path, lambda p: p.close_channel(target, channel_id))
    head = f"channel {closed.channel_id} {'was already closed' if closed.already else 'closed'}"
    click.echo(
        f"{head}: spent {closed.cumulative} in {closed.vouchers} vouchers, refunded "
        f"{closed.refund}; balance {closed.balance}\nsettlement receipt {closed.receipt_id}"
    )


@main.command()
@click.argument("url")
@click.option(
    "-X",
    "--request",
    "method",
    default=None,
    metavar="METHOD",
    help="HTTP method [default: GET, or POST with -d].",
)
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    metavar="'NAME: VALUE'",
    help="Extra request header (repeatable).",
)
@click.option(
    "-d", "--data", default=None, help="Request body; @FILE reads a file, @- reads stdin."
)
@click.option(
    "--max-amount",
    default=None,
    metavar="AMOUNT",
    help="Refuse to pay more than this per request (decimal, e.g. 0.50).",
)
@click.option("--asset", "assets", multiple=True, help="Only pay in this asset (repeatable).")
@click.option("--payee", "payees", multiple=True, help="Only pay this gateway id (repeatable).")
@click.option(
    "--wallet",
    type=click.Path(dir_okay=False),
    default=None,
    help="Agent key file from `x402 keygen` [default: env X402_WALLET or X402_WALLET_FILE].",
)
@click.option(
    "--evm-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="EVM key file (x402 keygen --evm): pays x402 `exact` where prepaid is not possible "
    "[default: env X402_EVM_KEY or X402_EVM_KEY_FILE].",
)
@click.option(
    "--direct/--challenge",
    default=True,
    show_default=True,
    help="Pay from the price list in one round trip, or always wait for the 402.",
)
@click.option("--strict", is_flag=True, help="An invalid receipt is an error, not a warning.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds.")
def pay(
    url: str,
    method: str | None,
    headers: tuple[str, ...],
    data: str | None,
    max_amount: str | None,
    assets: tuple[str, ...],
    payees: tuple[str, ...],
    wallet: str | None,
    evm_key: str | None,
    direct: bool,
    strict: bool,
    timeout: float,
) -> None:
    """Request URL like curl, paying if the gateway asks: body on stdout, receipt on stderr."""
    from sidecar.tools import pay as payment

    sys.exit(
        payment.run(
            payment.PayRequest(
                url=url,
                method=method,
                headers=headers,
                data=data,
                max_amount=max_amount,
                assets=assets,
                payees=payees,
                wallet=wallet,
                evm_key=evm_key,
                direct=direct,
                strict=strict,
                timeout=timeout,
            )
        )
    )


@main.command()
@click.argument("url")
@click.option(
    "--amount",
    required=True,
    metavar="AMOUNT",
    help="Credit to buy, a decimal in the gateway's top-up asset (e.g. 5).",
)
@click.option(
    "--wallet",
    type=click.Path(dir_okay=False),
    default=None,
    help="Ed25519 key file credited [default: env X402_WALLET or X402_WALLET_FILE].",
)
@click.option(
    "--evm-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="EVM key file that pays (x402 keygen --evm) [default: env X402_EVM_KEY or "
    "X402_EVM_KEY_FILE].",
)
@click.option("--asset", "assets", multiple=True, help="Only pay in this asset (repeatable).")
@click.option("--payee", "payees", multiple=True, help="Only pay this gateway id (repeatable).")
@click.option("--strict", is_flag=True, help="An invalid receipt is an error, not a warning.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds.")
def topup(
    url: str,
    amount: str,
    wallet: str | None,
    evm_key: str | None,
    assets: tuple[str, ...],
    payees: tuple[str, ...],
    strict: bool,
    timeout: float,
) -> None:
    """Buy prepaid credit at the gateway URL, paid with x402 `exact` from an EVM key."""
    from sidecar.tools import pay as payment

    request = payment.TopupRequest(url, amount, wallet, evm_key, assets, payees, strict, timeout)
    sys.exit(payment.run_topup(request))
