"""The operator's commands: run the sidecar, its secrets and Envoy config, the offers
preview, payers and settlement (evidence, anchors and reconciliation: audit.py)."""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import TYPE_CHECKING

import click

from sidecar.core.errors import UnknownPayer, X402Error
from sidecar.core.identity import write_secret
from sidecar.tools.cli.base import (
    KEY_ARGUMENTS,
    admin_options,
    check_key,
    config_option,
    ledger_call,
    main,
    payers_call,
    redis_option,
)

if TYPE_CHECKING:
    from sidecar.ledger.accounts import Ledger
    from sidecar.server.config import Settings


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

    from sidecar.server import supervisor as server
    from sidecar.server.config import Settings

    settings = Settings.load(config_path)
    if workers is not None:
        settings = dataclasses.replace(settings, workers=workers)
    server.run(settings)


@main.command("secret")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def secret_command(out: str) -> None:
    """Create a random invoice secret file (mode 0600)."""
    try:
        write_secret(out, secrets.token_urlsafe(32) + "\n")
    except FileExistsError:
        raise X402Error(f"{out} exists; refusing to overwrite a secret") from None
    click.echo(f"wrote {out}")


@main.command("envoy-config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="X402_CONFIG")
@click.option("--listen", default="0.0.0.0:10000", show_default=True)
@click.option(
    "--service",
    default="127.0.0.1:8080",
    show_default=True,
    help="The upstream service Envoy protects: IP:PORT, or HOST:PORT (resolved by DNS).",
)
@click.option(
    "--transport",
    type=click.Choice(["grpc", "http"]),
    default=None,
    help="How ext_authz asks the sidecar (default: the config's `transport`).",
)
@click.option(
    "--admin",
    default=None,
    help="Envoy's admin address (default: the config's `envoy_admin`, 127.0.0.1:9901).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="An origin that may read the gateway's own answers; repeat for more, '*' for any "
    "(default: the config's edge.cors_origins).",
)
def envoy_config(
    config_path: str | None,
    listen: str,
    service: str,
    transport: str | None,
    admin: str | None,
    cors_origins: tuple[str, ...],
) -> None:
    """Print an Envoy config that routes through the sidecar, prices from the config."""
    from sidecar.server.addresses import split_host_port
    from sidecar.server.config import Settings
    from sidecar.server.envoy.edge import Endpoints
    from sidecar.server.envoy.render import render_yaml, timeouts

    settings = Settings.load(config_path)
    if cors_origins:
        settings = replace(settings, edge={**settings.edge, "cors_origins": list(cors_origins)})
    authz_timeout, topup_timeout = timeouts(settings)
    endpoints = Endpoints(
        listen=split_host_port(listen, "--listen"),
        admin=split_host_port(admin, "--admin")
        if admin
        else split_host_port(settings.envoy_admin, "envoy_admin"),
        service=split_host_port(service, "--service"),
        authz=split_host_port(settings.listen_grpc, "listen_grpc"),
        authz_workers=settings.workers,
        transport=transport or settings.transport,
        authz_http=split_host_port(settings.listen_authz_http, "listen_authz_http"),
        sideport=split_host_port(settings.listen_http, "listen_http"),
        authz_timeout=authz_timeout,
        topup_timeout=topup_timeout,
        keep_responses=settings.replay_per_payer > 0,
    )
    click.echo(
        render_yaml(settings.routes, settings.default_asset, endpoints, settings.edge_config()),
        nl=False,
    )


@main.command("offers")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="X402_CONFIG",
    required=True,
    help="YAML config file (X402_<KEY> environment variables override it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: routes and tokens.")
@click.option(
    "--url",
    default="",
    help="The base URL agents reach (resource.url) [default: public_url, else localhost].",
)
def offers_command(config_path: str, as_json: bool, url: str) -> None:
    """Preview each priced route's 402 offers (accepts[], extensions); starts nothing."""
    import json

    from sidecar.server.config import Settings
    from sidecar.tools.offers import preview, render

    found = preview(Settings.load(config_path), url)
    click.echo(json.dumps(found, indent=2) if as_json else render(found))


@main.group()
def payer() -> None:
    """Register, credit, suspend payers and read balances."""


@payer.command("register", context_settings=KEY_ARGUMENTS)
@click.argument("public_key")
@redis_option
@config_option
@admin_options
def payer_register(public_key: str, redis_url: str | None, config_path: str | None) -> None:
    """Make an agent's public key known to the ledger."""
    check_key(public_key)
    registered = payers_call(redis_url, config_path, lambda p: p.register(public_key))
    click.echo("registered" if registered.created else "already registered")


@payer.command("credit", context_settings=KEY_ARGUMENTS)
@click.argument("public_key")
@click.argument("amount")
@click.option("--asset", default=None, help="Asset code [default: the config's default].")
@click.option(
    "--idempotency-key",
    default=None,
    help="Names the payment this credit records (an invoice or transfer id): re-running "
    "the command with the same key never credits twice. Required.",
)
@redis_option
@config_option
@admin_options
def payer_credit(
    public_key: str,
    amount: str,
    asset: str | None,
    idempotency_key: str | None,
    redis_url: str | None,
    config_path: str | None,
) -> None:
    """Add AMOUNT (a decimal like 10.5) to a registered payer's balance, once per
    --idempotency-key."""
    if not idempotency_key:
        raise X402Error(
            "--idempotency-key is required: name the payment this credit records (e.g. "
            "--idempotency-key invoice-2041), so running the command again never credits twice"
        )
    check_key(public_key)
    try:
        credited = payers_call(
            redis_url, config_path, lambda p: p.credit(public_key, amount, asset, idempotency_key)
        )
    except UnknownPayer as exc:
        raise X402Error(f"{exc}; register it first: x402 payer register {public_key}") from None
    verb = "credited" if credited.applied else "already applied (idempotency key seen)"
    click.echo(
        f"{verb}; balance {credited.balance} {credited.asset} (idempotency key {idempotency_key})"
    )


@payer.command("balance", context_settings=KEY_ARGUMENTS)
@click.argument("public_key")
@redis_option
@config_option
@admin_options
def payer_balance(public_key: str, redis_url: str | None, config_path: str | None) -> None:
    """Show a payer's status and balances."""
    balance = payers_call(redis_url, config_path, lambda p: p.balance(public_key))
    click.echo(f"status: {balance.status}")
    for entry in balance.assets:
        locked = f" (+{entry.channeled} in channels)" if entry.channeled != "0" else ""
        click.echo(f"{entry.asset}: {entry.balance}{locked}")


@payer.command("suspend", context_settings=KEY_ARGUMENTS)
@click.argument("public_key")
@redis_option
@config_option
@admin_options
def payer_suspend(public_key: str, redis_url: str | None, config_path: str | None) -> None:
    """Refuse this payer's proofs (403 payer_suspended) until activated again."""
    check_key(public_key)
    click.echo(payers_call(redis_url, config_path, lambda p: p.suspend(public_key)))


@payer.command("activate", context_settings=KEY_ARGUMENTS)
@click.argument("public_key")
@redis_option
@config_option
@admin_options
def payer_activate(public_key: str, redis_url: str | None, config_path: str | None) -> None:
    """Accept this payer's proofs again."""
    check_key(public_key)
    click.echo(payers_call(redis_url, config_path, lambda p: p.activate(public_key)))


@main.command()
@redis_option
@config_option
@click.option(
    "--flush/--no-flush",
    default=False,
    help="Settle every pending receipt now, whatever its age [default: no].",
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Keep settling every SECONDS until interrupted [default: one pass].",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[config]")
@click.option("--max-age", type=click.FloatRange(min=0), default=None, help="Seconds [config].")
@click.option("--lease", type=click.FloatRange(min=0.1), default=None, help="Seconds [config].")
@click.option("--anchor-file", default=None, help="JSONL anchor log; '' for none [config].")
@click.option("--worker-id", default=None, help="[default: host:pid]")
def settle(
    redis_url: str | None,
    config_path: str | None,
    flush: bool,
    watch: float | None,
    batch_size: int | None,
    max_age: float | None,
    lease: float | None,
    anchor_file: str | None,
    worker_id: str | None,
) -> None:
    """Batch receipts for settlement: Merkle root, signed manifest, anchor sinks. Safe to
    run several at once and to kill at any point."""
    from sidecar.tools.settle import SettleRequest
    from sidecar.tools.settle import settle as settle_due

    request = SettleRequest(flush, watch, batch_size, max_age, lease, anchor_file, worker_id)

    async def op(ledger: Ledger, settings: Settings) -> str:
        return await settle_due(ledger, settings, request)

    click.echo(ledger_call(redis_url, config_path, op))
