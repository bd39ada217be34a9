"""A developer's commands: the demo, the load generator, a local x402 facilitator, and the
demo service the tests start."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import click

from sidecar.core.errors import X402Error
from sidecar.tools.cli.base import DEMO_MODULES, SERVER_MODULES, main, redis_option


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
@click.option(
    "--examples",
    "examples_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("examples"),
    show_default=True,
    help="With --lane: a checkout's examples/ directory (the lanes and their harness).",
)
def demo(serve: bool, info: Path | None, lane: str | None, examples_dir: Path) -> None:
    """Start Redis, the sidecar, Envoy, a demo API, anvil with USDC and an x402 facilitator
    on loopback, and pay through them."""
    if info is not None and not serve:
        raise click.UsageError("--info needs --serve")
    if lane is not None:
        if serve:
            raise click.UsageError("--lane runs one lane and stops; it does not --serve")
        from sidecar.tools.demo import make_console

        lanes = _lanes_harness(examples_dir)
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


def _lanes_harness(examples_dir: Path) -> ModuleType:
    """examples/lanes.py, the examples' harness: it lives in a checkout, not in the wheel."""
    import importlib

    harness = examples_dir.resolve() / "lanes.py"
    if not harness.is_file():
        raise X402Error(
            f"{harness} not found: the lanes are the programs in a checkout's examples/ "
            "(run from the checkout, or give --examples DIR)"
        )
    sys.path.insert(0, str(harness.parent))  # as the examples import it: `import lanes`
    return importlib.import_module("lanes")


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
@click.option(
    "--require-bearer-file",
    default="",
    type=click.Path(dir_okay=False),
    help="Answer 401 unless `Authorization: Bearer <this file's token>` (mode 0600).",
)
@click.option(
    "--verify-processes",
    default=0,
    show_default=True,
    type=click.IntRange(0, 64),
    help=(
        "Answer /verify in this many processes of their own (0: in the settling one). "
        "Either way an exact payment /verify found valid in the last 10 s settles without "
        "simulating its transfer again."
    ),
)
def facilitator_serve(
    rpc_url: str,
    key_file: str,
    listen: str,
    network: str | None,
    require_bearer_file: str,
    verify_processes: int,
) -> None:
    """Serve POST /verify, POST /settle and GET /supported with the official x402 code."""
    try:
        from sidecar.tools import facilitator as served
    except ImportError as exc:  # the evm extra brings x402[evm] and aiohttp
        raise X402Error(f"{exc.name} missing: pip install 'x402-sidecar[evm]'") from None
    served.serve(rpc_url, key_file, listen, network, require_bearer_file, verify_processes)


@main.command(hidden=True)
@click.option("--host", default="127.0.0.1")
@click.option("--port", type=int, required=True)
@click.option("--log-headers", is_flag=True, help="Print each request's headers as JSON.")
def upstream(host: str, port: int, log_headers: bool) -> None:
    """Run the small demo service."""
    from sidecar.tools import upstream as demo_upstream

    demo_upstream.run(host, port, log_headers)
