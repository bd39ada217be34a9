"""The `x402` command group and what its commands share: one-line errors, the help grouped
by audience, the ledger and admin-API options. The commands live beside it by audience:
operator.py (the gateway's owner), agent.py (who pays), developer.py (who tries it out)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sidecar.core.errors import X402Error

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


# `x402 --help` lists the commands by who uses them; keygen serves both sides.
AUDIENCES = {
    "Operator": (
        "serve",
        "keygen",
        "secret",
        "envoy-config",
        "offers",
        "payer",
        "settle",
        "reconcile",
        "evidence",
        "anchor",
    ),
    "Agent": ("keygen", "pay", "topup", "channel"),
    "Developer": ("demo", "load", "facilitator"),
}


class Group(click.Group):
    """Turns every expected error into one readable line and exit status 1; lists its
    commands in the sections of AUDIENCES."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        listed: dict[str, click.Command] = {}
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                listed[name] = command
        width = formatter.width - 6 - max((len(name) for name in listed), default=0)
        sections = [*AUDIENCES.items(), ("Other", tuple(sorted(set(listed) - _audienced())))]
        for section, names in sections:
            rows = [(n, listed[n].get_short_help_str(width)) for n in names if n in listed]
            if rows:
                with formatter.section(section):
                    formatter.write_dl(rows)

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


def _audienced() -> set[str]:
    return {name for names in AUDIENCES.values() for name in names}


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


def ledger_call(
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


def payers_call(
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

    return ledger_call(redis_url, config_path, local)


# About 1 in 64 base64url keys starts with "-": click would take it for an option. Commands
# with a key argument keep unknown option-like words as arguments (none has short options).
KEY_ARGUMENTS = {"ignore_unknown_options": True}


def check_key(public_key: str) -> None:
    """Refuse a malformed key before anything connects anywhere."""
    from sidecar.ledger.payers import checked_key

    checked_key(public_key)
