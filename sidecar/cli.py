"""The `x402` command line: serve, keys, payers and configs. Errors are one line, no traceback."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from sidecar.config import Settings
from sidecar.envoy_config import Endpoints, render_yaml
from sidecar.errors import AmountError, X402Error
from sidecar.identity import Identity
from sidecar.ledger import ACTIVE, SUSPENDED, Ledger

T = TypeVar("T")


class Group(click.Group):
    """Turns every expected error into one readable line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except X402Error as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=Group)
@click.version_option(package_name="x402-sidecar")
def main() -> None:
    """HTTP 402 payments for any API behind Envoy."""


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="X402_CONFIG",
    help="YAML config file (X402_<KEY> environment variables override it).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes; worker i serves gRPC on listen_grpc's port + i "
    "[default: config key workers, or one per available core].",
)
def serve(config_path: str | None, workers: int | None) -> None:
    """Run the ext_authz sidecar."""
    import dataclasses

    from sidecar import server

    settings = Settings.load(config_path)
    if workers is not None:
        settings = dataclasses.replace(settings, workers=workers)
    server.run(settings)


@main.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    help="Where to write the private key (mode 0600; never overwritten).",
)
def keygen(out: str) -> None:
    """Create an Ed25519 key: a gateway signing key or an agent wallet."""
    identity = Identity.generate()
    try:
        identity.save(out)
    except FileExistsError:
        raise X402Error(f"{out} exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise X402Error(f"cannot write {out}: {exc.strerror}") from None
    click.echo(f"public key: {identity.public_key}")
    click.echo(f"key id:     {identity.kid}")


@main.command("secret")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def secret_command(out: str) -> None:
    """Create a random invoice secret file (mode 0600)."""
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise X402Error(f"{out} exists; refusing to overwrite a secret") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    click.echo(f"wrote {out}")


@main.command("envoy-config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="X402_CONFIG")
@click.option("--listen", default="0.0.0.0:10000", show_default=True)
@click.option(
    "--service",
    default="127.0.0.1:8080",
    show_default=True,
    help="The upstream service Envoy protects.",
)
def envoy_config(config_path: str | None, listen: str, service: str) -> None:
    """Print an Envoy config that routes through the sidecar, prices from the config."""
    from sidecar.server import split_host_port

    settings = Settings.load(config_path)
    endpoints = Endpoints(
        listen=split_host_port(listen, "--listen"),
        service=split_host_port(service, "--service"),
        authz=split_host_port(settings.listen_grpc, "listen_grpc"),
        authz_workers=settings.workers,
        sideport=split_host_port(settings.listen_http, "listen_http"),
    )
    click.echo(render_yaml(settings.routes, settings.default_asset, endpoints), nl=False)


@main.command(hidden=True)
@click.option("--host", default="127.0.0.1")
@click.option("--port", type=int, required=True)
def upstream(host: str, port: int) -> None:
    """Run the small demo service."""
    from sidecar import upstream as demo_upstream

    demo_upstream.run(host, port)


# -- payers ------------------------------------------------------------------------------

redis_option = click.option(
    "--redis",
    "redis_url",
    envvar=["REDIS_URL", "X402_REDIS_URL"],
    help="Redis URL of the ledger [env REDIS_URL].",
)
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="X402_CONFIG",
    help="Sidecar config, for its assets and Redis URL.",
)


def _ledger_call(
    redis_url: str | None, config_path: str | None, op: Callable[[Ledger, Settings], Awaitable[T]]
) -> T:
    settings = Settings.load(config_path)

    async def run() -> T:
        ledger = Ledger.from_url(redis_url or settings.redis_url)
        try:
            return await op(ledger, settings)
        finally:
            await ledger.close()

    return asyncio.run(run())


@main.group()
def payer() -> None:
    """Register, credit, suspend payers and read balances."""


@payer.command("register")
@click.argument("public_key")
@redis_option
@config_option
def payer_register(public_key: str, redis_url: str | None, config_path: str | None) -> None:
    """Make an agent's public key known to the ledger."""
    _check_public_key(public_key)
    created = _ledger_call(redis_url, config_path, lambda ledger, _s: ledger.register(public_key))
    click.echo("registered" if created else "already registered")


@payer.command("credit")
@click.argument("public_key")
@click.argument("amount")
@click.option("--asset", default=None, help="Asset code [default: the config's default].")
@click.option(
    "--idempotency-key",
    default=None,
    help="Retrying with the same key never credits twice [default: random].",
)
@redis_option
@config_option
def payer_credit(
    public_key: str,
    amount: str,
    asset: str | None,
    idempotency_key: str | None,
    redis_url: str | None,
    config_path: str | None,
) -> None:
    """Add AMOUNT (a decimal like 10.5) to a payer's balance."""
    _check_public_key(public_key)
    key = idempotency_key or secrets.token_urlsafe(12)

    async def op(ledger: Ledger, settings: Settings) -> str:
        code = asset or settings.default_asset
        assets = settings.asset_table()
        if code not in assets:
            raise X402Error(f"unknown asset {code!r} (known: {', '.join(assets)})")
        try:
            atomic = assets[code].to_atomic(amount)
        except AmountError as exc:
            raise X402Error(str(exc)) from None
        result = await ledger.credit(public_key, code, atomic, key)
        verb = "credited" if result.applied else "already applied (idempotency key seen)"
        return (
            f"{verb}; balance {assets[code].to_decimal(result.balance)} {code} "
            f"(idempotency key {key})"
        )

    click.echo(_ledger_call(redis_url, config_path, op))


@payer.command("balance")
@click.argument("public_key")
@redis_option
@config_option
def payer_balance(public_key: str, redis_url: str | None, config_path: str | None) -> None:
    """Show a payer's status and balances."""

    async def op(ledger: Ledger, settings: Settings) -> str:
        account = await ledger.account(public_key)
        assets = settings.asset_table()
        lines = [f"status: {account.status}"]
        for code in sorted(set(account.balances) | set(assets)):
            atomic = account.balances.get(code, 0)
            shown = assets[code].to_decimal(atomic) if code in assets else f"{atomic} (atomic)"
            lines.append(f"{code}: {shown}")
        return "\n".join(lines)

    click.echo(_ledger_call(redis_url, config_path, op))


@payer.command("suspend")
@click.argument("public_key")
@redis_option
@config_option
def payer_suspend(public_key: str, redis_url: str | None, config_path: str | None) -> None:
    """Refuse this payer's proofs (403 payer_suspended) until activated again."""
    _ledger_call(
        redis_url, config_path, lambda ledger, _s: ledger.set_status(public_key, SUSPENDED)
    )
    click.echo("suspended")


@payer.command("activate")
@click.argument("public_key")
@redis_option
@config_option
def payer_activate(public_key: str, redis_url: str | None, config_path: str | None) -> None:
    """Accept this payer's proofs again."""
    _ledger_call(redis_url, config_path, lambda ledger, _s: ledger.set_status(public_key, ACTIVE))
    click.echo("active")


def _check_public_key(public_key: str) -> None:
    from sidecar.identity import verify_key

    try:
        verify_key(public_key)
    except ValueError:
        raise X402Error(
            "not a public key: expected base64url of 32 bytes (see x402 keygen)"
        ) from None


# -- agents: pay and demo -----------------------------------------------------------------


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
    direct: bool,
    strict: bool,
    timeout: float,
) -> None:
    """Request URL like curl, paying if the gateway asks: body on stdout, receipt on stderr."""
    from sidecar import payment

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
                direct=direct,
                strict=strict,
                timeout=timeout,
            )
        )
    )


@main.command()
@click.option(
    "--serve", is_flag=True, help="Keep the stack running for your own agent until Ctrl-C."
)
def demo(serve: bool) -> None:
    """Start Redis, the sidecar, Envoy and a demo API on loopback, and pay through them."""
    from sidecar import demo as demo_story

    sys.exit(demo_story.run(serve=serve))


# -- load ------------------------------------------------------------------------------


@main.command("load")
@click.option(
    "--url", required=True, help="The gateway agents call (Envoy), e.g. http://127.0.0.1:10000."
)
@click.option(
    "--route",
    "routes",
    multiple=True,
    required=True,
    help="A priced route: its path pattern, 'METHOD PATH', or a concrete path (repeatable).",
)
@click.option("--duration", default="10s", show_default=True, help="How long: 30s, 2m, 500ms.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Loops in flight at once.",
)
@click.option(
    "--agents",
    type=click.IntRange(min=0),
    default=0,
    help="Agent wallets [default: one per concurrent loop].",
)
@click.option(
    "--direct",
    is_flag=True,
    help="Pay from the price list in one request instead of 402 → sign → retry.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Start at most this many loops per second [default: no limit].",
)
@click.option(
    "--fund",
    default="",
    help="Credit per agent, decimal [default: 100,000 loops of the dearest route].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the summary as JSON here.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@redis_option
def load_command(
    url: str,
    routes: tuple[str, ...],
    duration: str,
    concurrency: int,
    agents: int,
    direct: bool,
    rate: float,
    fund: str,
    json_path: str | None,
    progress: bool,
    redis_url: str | None,
) -> None:
    """Push priced routes with many agents and count the challenge loops the stack clears."""
    from sidecar import load

    if not redis_url:
        raise X402Error("--redis (or REDIS_URL) is needed to register and credit the agents")
    config = load.LoadConfig(
        url=url,
        redis_url=redis_url,
        routes=routes,
        duration=load.parse_duration(duration),
        concurrency=concurrency,
        agents=agents,
        direct=direct,
        rate=rate,
        fund=fund,
    )
    stats = load.main(config, json_path, progress)
    if not stats.cleared:
        sys.exit(1)  # not one loop cleared: the stack or the setup is broken


if __name__ == "__main__":
    main()
