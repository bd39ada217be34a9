"""The `x402` command line: serve, keys, payers and configs. Errors are one line, no traceback."""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sidecar.core.errors import UnknownPayer, X402Error
from sidecar.core.identity import Identity, write_secret

if TYPE_CHECKING:  # the gateway's modules load only for the commands that need them
    from sidecar.ledger.accounts import Ledger
    from sidecar.ledger.payers import Payers
    from sidecar.server.config import Settings
    from sidecar.tools.admin_client import AdminPayers, AdminTarget

T = TypeVar("T")


# The base install is the agent SDK; these come with the `server` extra.
SERVER_MODULES = frozenset(
    {
        "grpc",
        "grpc_health",
        "envoy",
        "redis",
        "hiredis",
        "structlog",
        "prometheus_client",
        "yaml",
        "httptools",
    }
)

# `x402 demo` also runs the chain's lanes: the `evm` extra, which the `demo` extra brings.
DEMO_MODULES = frozenset({"x402", "web3", "eth_account", "eth_typing", "aiohttp", "rich"})


class Group(click.Group):
    """Turns every expected error into one readable line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except X402Error as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in SERVER_MODULES:
                raise
            click.echo(
                f"error: this command runs the gateway ({exc.name} is missing): "
                "pip install 'x402-sidecar[server]'",
                err=True,
            )
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

    from sidecar.server import supervisor as server
    from sidecar.server.config import Settings

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
    )
    click.echo(
        render_yaml(settings.routes, settings.default_asset, endpoints, settings.edge_config()),
        nl=False,
    )


@main.command(hidden=True)
@click.option("--host", default="127.0.0.1")
@click.option("--port", type=int, required=True)
@click.option("--log-headers", is_flag=True, help="Print each request's headers as JSON.")
def upstream(host: str, port: int, log_headers: bool) -> None:
    """Run the small demo service."""
    from sidecar.tools import upstream as demo_upstream

    demo_upstream.run(host, port, log_headers)


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
    from sidecar.core.errors import LedgerUnavailable
    from sidecar.ledger.accounts import Ledger
    from sidecar.server.config import Settings

    settings = Settings.load(config_path)

    async def run() -> T:
        ledger = Ledger.from_url(redis_url or settings.redis_url)
        try:
            return await op(ledger, settings)
        except LedgerUnavailable as exc:  # where and why, never the password
            raise X402Error(f"ledger at {ledger.url} unavailable: {exc.__cause__ or exc}") from None
        finally:
            await ledger.close()

    return asyncio.run(run())


def _remember_admin(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[f"x402.{param.name}"] = value
    return value


def admin_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--admin ADDR` (and its credentials): run the command through the facilitator admin
    API instead of Redis. Kept out of the command's parameters (see _admin_target)."""
    options = [
        ("--admin", "X402_ADMIN", "Use the admin API at host:port instead of Redis."),
        ("--admin-token-file", "X402_ADMIN_TOKEN_FILE", "The admin API's bearer token."),
        ("--admin-ca", None, "CA of the admin API's TLS certificate (enables TLS)."),
        ("--admin-cert", None, "Client certificate for mutual TLS."),
        ("--admin-key", None, "Client certificate's key for mutual TLS."),
    ]
    for flag, envvar, text in reversed(options):
        command = click.option(
            flag, envvar=envvar, expose_value=False, callback=_remember_admin, help=text
        )(command)
    return command


def _admin_target() -> AdminTarget | None:
    """Where --admin points (with its credentials), or None: use Redis directly."""
    from sidecar.tools.admin_client import AdminTarget

    meta = click.get_current_context().meta
    if not meta.get("x402.admin"):
        return None
    return AdminTarget(
        meta["x402.admin"],
        meta.get("x402.admin_token_file"),
        meta.get("x402.admin_ca"),
        meta.get("x402.admin_cert"),
        meta.get("x402.admin_key"),
    )


def _payers_call(
    redis_url: str | None,
    config_path: str | None,
    call: Callable[[Payers | AdminPayers], Awaitable[T]],
    channels: bool = False,
) -> T:
    """Run `call` on the payer service: over the admin API with --admin, else on Redis.
    `channels`: the local service needs the gateway's key id (channels are opened to it)."""
    target = _admin_target()
    if target is not None:
        from sidecar.tools.admin_client import AdminPayers

        async def remote() -> T:
            payers = AdminPayers(target)
            try:
                return await call(payers)
            finally:
                await payers.close()

        return asyncio.run(remote())

    from sidecar.server import wiring

    async def local(ledger: Ledger, settings: Settings) -> T:
        payee = settings.signing_keys().current.kid if channels else None
        return await call(wiring.payers(settings, ledger, payee))

    return _ledger_call(redis_url, config_path, local)


# About 1 in 64 base64url keys starts with "-": click would take it for an option. Commands
# with a key argument keep unknown option-like words as arguments (none has short options).
KEY_ARGUMENTS = {"ignore_unknown_options": True}


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
    _check_key(public_key)
    registered = _payers_call(redis_url, config_path, lambda p: p.register(public_key))
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
    _check_key(public_key)
    try:
        credited = _payers_call(
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
    balance = _payers_call(redis_url, config_path, lambda p: p.balance(public_key))
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
    _check_key(public_key)
    click.echo(_payers_call(redis_url, config_path, lambda p: p.suspend(public_key)))


@payer.command("activate", context_settings=KEY_ARGUMENTS)
@click.argument("public_key")
@redis_option
@config_option
@admin_options
def payer_activate(public_key: str, redis_url: str | None, config_path: str | None) -> None:
    """Accept this payer's proofs again."""
    _check_key(public_key)
    click.echo(_payers_call(redis_url, config_path, lambda p: p.activate(public_key)))


def _check_key(public_key: str) -> None:
    """Refuse a malformed key before anything connects anywhere."""
    from sidecar.ledger.payers import checked_key

    checked_key(public_key)


# -- settlement, evidence, channels (logic in ledger/ and core/: batches, bundles) --------


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
    from sidecar.server import wiring

    async def op(ledger: Ledger, settings: Settings) -> str:
        worker = wiring.settler(
            settings,
            ledger,
            settings.signing_keys(),
            anchor_file=anchor_file,
            batch_size=batch_size,
            max_age=max_age,
            lease=lease,
            flush=flush or None,
            worker_id=worker_id,
        )
        if watch is not None:
            await worker.run_forever(watch, asyncio.Event())
        report = await worker.run_once()
        lines = [
            f"{m['batch_id']} payer {m['payer'][:12]}… seq {m['seq']}: {m['count']} receipts, "
            f"root {m['merkle_root'][:16]}…"
            for m in report.batches
        ]
        lines.append(
            f"settled {report.receipts} receipts in {len(report.batches)} batches "
            f"({report.payers} payers; {report.waiting} waiting, {report.busy} busy, "
            f"{report.failed} failed)"
        )
        if report.failed:
            raise X402Error("\n".join([*lines, "some batches failed; see the log"]))
        return "\n".join(lines)

    click.echo(_ledger_call(redis_url, config_path, op))


@main.group()
def evidence() -> None:
    """Export and verify evidence bundles (receipts, Merkle proofs, signed manifests)."""


def _unix_time(value: str | None) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise X402Error(f"{value!r} is neither unix seconds nor an ISO 8601 time") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


@evidence.command("export")
@click.option("--receipt", "receipt_id", default=None, help="One receipt id (rcpt_…).")
@click.option("--payer", "payer_key", default=None, help="One payer's receipts.")
@click.option("--since", default=None, help="Issued at or after (unix seconds or ISO 8601).")
@click.option("--until", default=None, help="Issued before (unix seconds or ISO 8601).")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@redis_option
@config_option
def evidence_export(
    receipt_id: str | None,
    payer_key: str | None,
    since: str | None,
    until: str | None,
    out: str,
    redis_url: str | None,
    config_path: str | None,
) -> None:
    """Write the settled receipts a query matches, their proofs and manifests, signed."""
    import json

    from sidecar.ledger import evidence as bundles

    if not (receipt_id or payer_key or since or until):
        raise X402Error("say what to export: --receipt, --payer, --since/--until")
    query = bundles.Query(receipt_id, payer_key, _unix_time(since), _unix_time(until))

    async def op(ledger: Ledger, settings: Settings) -> bundles.Export:
        return await bundles.export(ledger, settings.signing_keys(), settings.asset_table(), query)

    result = _ledger_call(redis_url, config_path, op)
    receipts = len(result.bundle["receipts"])
    if receipt_id and not receipts:
        raise X402Error(f"receipt {receipt_id} is in no settled batch (run x402 settle)")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result.bundle, f, indent=1, sort_keys=True)
    click.echo(f"wrote {out}: {receipts} receipts in {len(result.bundle['batches'])} batches")
    if result.unsettled:
        click.echo(f"{result.unsettled} matching receipts are not settled yet (not exported)")
    if result.expired:
        click.echo(
            f"{result.expired} batches are past receipt_retention_seconds: their receipts "
            "left the ledger (their manifests remain in anchor_file)"
        )


@evidence.command("verify")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--key",
    "keys",
    required=True,
    multiple=True,
    help="A gateway public key (base64url), or a file holding one, or the gateway's "
    "discovery document (/.well-known/x402) saved as JSON: its whole key set. Repeatable: "
    "after a rotation, the previous keys too.",
)
def evidence_verify(bundle: str, keys: tuple[str, ...]) -> None:
    """Check a bundle offline; exit 1 and name every problem if anything fails."""
    import json
    from pathlib import Path

    from sidecar.core import bundles

    public_keys: dict[str, str] = {}
    for key in keys:
        public_keys.update(_key_set(key))
    try:
        document = json.loads(Path(bundle).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise X402Error(f"cannot read {bundle}: {exc}") from None
    verdict = bundles.verify_bundle(document, public_keys)
    if verdict.ok:
        click.echo(f"OK: {verdict.receipts} receipts in {verdict.batches} batches verify")
        return
    for problem in verdict.problems:
        click.echo(f"FAIL: {problem}")
    sys.exit(1)


def _key_set(key: str) -> dict[str, str]:
    """One --key: a public key, or a file holding one or a discovery document."""
    from pathlib import Path

    from sidecar.core.identity import parse_key_set

    try:
        return parse_key_set(Path(key).read_text() if Path(key).is_file() else key)
    except ValueError as exc:
        raise X402Error(f"--key {key[:60]}: no public key nor discovery document ({exc})") from None


@main.group()
def channel() -> None:
    """Open and close payment channels (a deposit locked for vouchered requests)."""


@channel.command("open", context_settings=KEY_ARGUMENTS)
@click.argument("public_key")
@click.argument("deposit")
@click.option("--asset", default=None, help="Asset code [default: the config's default].")
@click.option("--ttl", type=click.IntRange(min=1), default=86400, show_default=True)
@click.option("--id", "channel_id", default=None, help="Channel id [default: random].")
@redis_option
@config_option
@admin_options
def channel_open(
    public_key: str,
    deposit: str,
    asset: str | None,
    ttl: int,
    channel_id: str | None,
    redis_url: str | None,
    config_path: str | None,
) -> None:
    """Lock DEPOSIT (a decimal) from a payer's balance into a new channel."""
    _check_key(public_key)
    opened = _payers_call(
        redis_url,
        config_path,
        lambda p: p.open_channel(public_key, deposit, asset, ttl, channel_id),
        channels=True,
    )
    click.echo(
        f"channel {opened.channel_id}\n"
        f"deposit {opened.deposit} {opened.asset}, open until {opened.expires_at} (unix time)\n"
        f"balance left {opened.balance} {opened.asset}"
    )


@channel.command("close", context_settings=KEY_ARGUMENTS)
@click.argument("public_key")
@click.argument("channel_id")
@redis_option
@config_option
@admin_options
def channel_close(
    public_key: str, channel_id: str, redis_url: str | None, config_path: str | None
) -> None:
    """Refund what is left of the deposit; the final voucher goes to settlement."""
    _check_key(public_key)
    closed = _payers_call(redis_url, config_path, lambda p: p.close_channel(public_key, channel_id))
    head = f"channel {closed.channel_id} {'was already closed' if closed.already else 'closed'}"
    click.echo(
        f"{head}: spent {closed.cumulative} in {closed.vouchers} vouchers, refunded "
        f"{closed.refund}; balance {closed.balance}\nsettlement receipt {closed.receipt_id}"
    )


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
    import warnings

    import httpx

    from sidecar.agent.topup import topup as buy
    from sidecar.agent.wallet import Wallet
    from sidecar.core.errors import ReceiptWarning

    agent = Wallet.load(wallet, evm_key_file=evm_key, assets=assets or None, payees=payees or None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReceiptWarning)
        try:
            done = buy(url, agent, amount, strict=strict, request_timeout=timeout)
        except httpx.HTTPError as exc:
            raise X402Error(f"top-up at {url}: {exc.__class__.__name__}: {exc}") from None
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    check = "verified" if done.verified else "NOT VERIFIED"
    click.echo(f"credited {done.credited} {done.asset} to {done.payer}")
    click.echo(f"balance {done.balance} {done.asset}")
    click.echo(f"transaction {done.transaction}")
    click.echo(f"receipt {done.receipt_id} ({check})")


@main.command()
@click.option(
    "--serve", is_flag=True, help="Keep the stack running for your own agent until Ctrl-C."
)
@click.option(
    "--info",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --serve: write what a client needs (URLs, keys) to FILE as JSON, mode 0600.",
)
@click.option(
    "--lane",
    metavar="NAME",
    help="Run one lane of examples/ narrated instead: content, per-token, swarm, channel, "
    "per-row, ci, compliance.",
)
def demo(serve: bool, info: Path | None, lane: str | None) -> None:
    """Start Redis, the sidecar, Envoy, a demo API, anvil with USDC and an x402 facilitator
    on loopback, and pay through them."""
    if info is not None and not serve:
        raise click.UsageError("--info needs --serve")
    if lane is not None:
        if serve:
            raise click.UsageError("--lane runs one lane and stops; it does not --serve")
        from sidecar.tools import lanes
        from sidecar.tools.demo import make_console

        if lane not in lanes.EXAMPLES:
            raise click.UsageError(f"--lane: one of {', '.join(lanes.EXAMPLES)}, not {lane!r}")
        sys.exit(lanes.narrate(lane, make_console()))
    try:
        from sidecar.tools import demo as demo_story
    except ModuleNotFoundError as exc:  # the demo extra brings the server and evm extras
        if (exc.name or "").split(".")[0] not in SERVER_MODULES | DEMO_MODULES:
            raise
        raise X402Error(
            f"x402 demo needs the demo extra ({exc.name} is missing): "
            "pip install 'x402-sidecar[demo]'"
        ) from None

    sys.exit(demo_story.run(serve=serve, info=info))


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
    "--processes",
    type=click.IntRange(min=0),
    default=0,
    help="Generator processes, the loops split among them [default: one per core].",
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
    processes: int,
    direct: bool,
    rate: float,
    fund: str,
    json_path: str | None,
    progress: bool,
    redis_url: str | None,
) -> None:
    """Push priced routes with many agents and count the challenge loops the stack clears."""
    from sidecar.tools import load

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
        processes=processes,
    )
    stats = load.main(config, json_path, progress)
    if not stats.cleared:
        sys.exit(1)  # not one loop cleared: the stack or the setup is broken


@main.group()
def facilitator() -> None:
    """The standard x402 facilitator (verify, settle, supported) on an EVM chain."""


@facilitator.command("serve")
@click.option("--rpc-url", required=True, help="The chain's JSON-RPC URL.")
@click.option(
    "--key-file",
    required=True,
    type=click.Path(dir_okay=False),
    help="Hex private key of the account that pays gas (mode 0600).",
)
@click.option("--listen", default="127.0.0.1:4022", show_default=True, help="HOST:PORT.")
@click.option("--network", default=None, help="eip155:<chainId> [default: the chain's].")
def facilitator_serve(rpc_url: str, key_file: str, listen: str, network: str | None) -> None:
    """Serve POST /verify, POST /settle and GET /supported with the official x402 code."""
    try:
        from sidecar.tools import facilitator as served
    except ImportError as exc:  # the evm extra brings x402[evm] and aiohttp
        raise X402Error(f"{exc.name} missing: pip install 'x402-sidecar[evm]'") from None
    served.serve(rpc_url, key_file, listen, network)


if __name__ == "__main__":
    main()
