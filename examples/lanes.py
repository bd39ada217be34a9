"""The examples' harness (beside them, not in the wheel): the product's lanes as runnable
worlds: the gateways (each its own Redis, sidecar, Envoy, upstream and key: one operator
each), optionally a shared anvil chain with USDC and an x402 facilitator, and one agent
identity. Used by the programs in `examples/`, their tests and `x402 demo --lane`.

`World` is what a lane's program needs to know (URLs, keys, config files), as JSON: a
test starts the world, writes it with `World.save`, runs the example with `--info FILE`,
then checks the ledgers and the chain itself. Without `--info` the example starts its own
world (`start`). The operator's side (credit, settlement, evidence) goes through
the ledger with the gateway's own config, as the `x402` CLI does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sidecar.agent.evm import EvmKey
from sidecar.agent.wallet import Wallet
from sidecar.core.identity import Identity, write_secret
from sidecar.core.money import to_atomic
from sidecar.ledger.accounts import Ledger
from sidecar.server.config import Settings
from sidecar.tools.mcp_stack import McpStack
from sidecar.tools.stack import LOOPBACK, Process, Stack, free_port, wait_http

Routes = Mapping[str, Mapping[str, Any]]
EXAMPLES_DIR = Path(__file__).resolve().parent  # the example programs, and this harness
DECIMALS = 6  # USDF, the gateways' default asset


@dataclass(frozen=True)
class Spec:
    """A lane's world: its gateways' routes, what the operator credits the agent at each
    (none when the agent funds itself), and whether a chain backs USDF."""

    gateways: Mapping[str, Routes]
    credit: Mapping[str, str] = field(default_factory=dict)
    chain: bool = False
    mint: int = 0  # atomic USDC minted to the agent's EVM key (the chain's faucet)
    # Gateways whose service is a specialist agent (examples/specialist.py) that pays
    # another gateway's route for each task: name → (downstream gateway, path). Each has
    # its own wallet, credited `chained_credit` by the downstream operator.
    chained: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    chained_credit: str = "1"
    dashboard: bool = False  # each gateway serves the operator's dashboard (admin token)
    mcp: bool = False  # each gateway's service is an unmodified FastMCP server (/mcp)


@dataclass(frozen=True)
class ServedGateway:
    """One operator's gateway: where agents connect and, for its operator, its ledger."""

    name: str
    url: str
    redis_url: str
    config: str  # the sidecar's config file (the operator's commands read it)
    key: str  # the receipt-signing public key
    pay_to: str = ""  # the operator's on-chain address ("" without a chain)
    dashboard: str = ""  # the operator's dashboard URL ("" when not served)
    admin_token_file: str = ""  # what opens it

    def dashboard_summary(self) -> dict[str, Any]:
        """The dashboard's own figures (GET /api/summary), logged in with the admin token."""
        import httpx

        from sidecar.core.errors import X402Error

        token = Path(self.admin_token_file).read_text().strip()
        with httpx.Client(base_url=self.dashboard, timeout=10) as http:
            login = http.post("/login", data={"token": token})
            if login.status_code != 303:  # logged in: a session cookie and a redirect
                raise X402Error(f"dashboard login refused: {login.status_code}")
            summary = http.get("/api/summary")
            summary.raise_for_status()
            found: dict[str, Any] = summary.json()
            return found

    def _run(self, op: Callable[[Ledger, Settings], Any]) -> Any:
        settings = Settings.load(self.config)

        async def run() -> Any:
            ledger = Ledger.from_url(self.redis_url)
            try:
                return await op(ledger, settings)
            finally:
                await ledger.close()

        return asyncio.run(run())

    def balance(self, payer: str) -> int:
        """The payer's USDF balance in this gateway's ledger, atomic units."""

        async def op(ledger: Ledger, settings: Settings) -> int:
            return (await ledger.account(payer)).balances.get("USDF", 0)

        result: int = self._run(op)
        return result

    def credit(self, payer: str, amount: str) -> None:
        """The operator credits a payer (`x402 payer credit`)."""

        async def op(ledger: Ledger, settings: Settings) -> None:
            await ledger.register(payer)
            await ledger.credit(
                payer, "USDF", to_atomic(amount, DECIMALS), secrets.token_urlsafe(12)
            )

        self._run(op)

    def revenue(self) -> dict[str, int]:
        """What each payer paid this gateway (atomic USDF, from the receipt streams): the
        operator's revenue by payer."""

        async def op(ledger: Ledger, settings: Settings) -> dict[str, int]:
            payers = [p async for p in ledger.scan_payers()]
            paid = {
                p: sum(int(r["amount"]) for r in await ledger.receipts(p, 10_000)) for p in payers
            }
            return {payer: amount for payer, amount in paid.items() if amount}

        found: dict[str, int] = self._run(op)
        return found

    def receipts(self, payer: str) -> list[dict[str, str]]:
        """The payer's receipts in this ledger (their facts), oldest first."""

        async def op(ledger: Ledger, settings: Settings) -> list[dict[str, str]]:
            return await ledger.receipts(payer, 1000)

        found: list[dict[str, str]] = self._run(op)
        return found


@dataclass(frozen=True)
class World:
    gateways: Mapping[str, ServedGateway]
    agent_key: str  # the agent's Ed25519 seed text: one identity at every gateway
    evm_key: str = ""  # the agent's EVM key (hex), when a chain backs USDF
    rpc_url: str = ""
    token: str = ""  # the USDC contract
    specialists: Mapping[str, str] = field(default_factory=dict)  # gateway → its payer key

    def wallet(self, **guards: Any) -> Wallet:
        """The agent's wallet (both keys), with spending guards."""
        evm = EvmKey.from_text(self.evm_key) if self.evm_key else None
        return Wallet(Identity.from_seed_text(self.agent_key), evm=evm, **guards)

    def usdc(self, address: str) -> int:
        """An address's USDC balance on the chain, atomic units."""
        from web3 import Web3

        w3 = Web3(Web3.HTTPProvider(self.rpc_url))
        abi = [
            {
                "name": "balanceOf",
                "type": "function",
                "stateMutability": "view",
                "inputs": [{"name": "a", "type": "address"}],
                "outputs": [{"name": "", "type": "uint256"}],
            }
        ]
        token = w3.eth.contract(address=Web3.to_checksum_address(self.token), abi=abi)
        balance: int = token.functions.balanceOf(Web3.to_checksum_address(address)).call()
        return balance

    def save(self, path: Path) -> None:
        document = asdict(self)
        path.write_text(json.dumps(document, indent=1))
        path.chmod(0o600)

    @classmethod
    def load(cls, path: Path, spec: Spec | None = None) -> World:
        """A world saved by `save`, or the `--info` file of `x402 demo --serve`: its one
        gateway then stands for each of the lane's gateways (`spec`)."""
        document = json.loads(path.read_text())
        if "gateway_url" in document:
            return cls.from_demo(document, spec.gateways if spec else {"api": {}})
        gateways = {name: ServedGateway(**spec) for name, spec in document.pop("gateways").items()}
        return cls(gateways=gateways, **document)

    @classmethod
    def from_demo(cls, facts: Mapping[str, Any], names: Iterable[str]) -> World:
        import httpx

        workdir = Path(facts["wallet_file"]).parent  # the demo stack's directory
        discovery = httpx.get(facts["discovery_url"], timeout=10).json()
        gateway = ServedGateway(
            "demo",
            facts["gateway_url"],
            facts["redis_url"],
            str(workdir / "x402.yaml"),
            discovery["keys"][0]["public_key"],
            facts.get("pay_to") or "",
        )
        return cls(
            {name: replace(gateway, name=name) for name in names},
            Identity.load(facts["wallet_file"]).seed_text,
            facts.get("evm_private_key") or "",
            facts.get("chain_rpc_url") or "",
            facts.get("token_address") or "",
        )


@dataclass
class SpecialistStack(Stack):
    """A gateway whose service is a specialist agent paying `downstream` per task."""

    downstream: str = ""
    wallet_seed: str = ""

    def start_upstream(self) -> Process:
        port = self.ports["upstream"]
        argv = [sys.executable, str(EXAMPLES_DIR / "specialist.py"), "--port", str(port)]
        argv += ["--downstream", self.downstream]
        process = self._spawn("upstream", argv, env={"X402_WALLET": self.wallet_seed})
        wait_http(f"http://{LOOPBACK}:{port}/", process=process)
        return process


def _start_but_envoy(stack: Stack) -> None:
    stack.write_files()
    stack.start_redis()
    stack.start_upstream()
    stack.start_sidecar()


@contextmanager
def start(spec: Spec) -> Iterator[World]:
    """Start the lane's world on loopback; everything stops on exit."""
    with ExitStack() as running:
        agent = Wallet.generate(evm=spec.chain)
        settings: dict[str, dict[str, Any]] = {name: {} for name in spec.gateways}
        rpc_url = token = evm_key = ""
        pay_to: dict[str, str] = {name: "" for name in spec.gateways}
        if spec.chain:
            from sidecar.tools.chain import AnvilChain
            from sidecar.tools.onchain import FacilitatorProcess, exact_settings

            chain = running.enter_context(AnvilChain())
            workdir = Path(running.enter_context(tempfile.TemporaryDirectory(prefix="x402-")))
            facilitator = FacilitatorProcess(chain, workdir).start()
            running.callback(facilitator.stop)
            # Three operators, three payees: spare[0] is the facilitator's, spare[1:] are free.
            operators = chain.spare[1:]
            for index, name in enumerate(spec.gateways):
                pay_to[name] = operators[index].address
                settings[name] = exact_settings(chain, facilitator, pay_to=pay_to[name])
            assert agent.evm is not None
            chain.mint(agent.evm.address, spec.mint)
            rpc_url, token, evm_key = chain.rpc_url, chain.token, agent.evm.hex
        kind = McpStack if spec.mcp else Stack
        stacks: dict[str, Stack] = {
            name: kind(routes, settings=settings[name])
            for name, routes in spec.gateways.items()
            if name not in spec.chained
        }
        specialists: dict[str, Wallet] = {}
        for name, (downstream, path) in spec.chained.items():
            specialists[name] = Wallet.generate()
            stacks[name] = SpecialistStack(
                spec.gateways[name],
                settings=settings[name],
                downstream=stacks[downstream].url + path,
                wallet_seed=specialists[name].identity.seed_text,
            )
        for stack in stacks.values():
            running.callback(stack.stop)
            if spec.dashboard:
                token_file = stack.dir / "admin.token"
                write_secret(token_file, secrets.token_urlsafe(24) + "\n")
                stack.ports["dashboard"] = free_port(stack.taken)
                stack.settings = {
                    **stack.settings,
                    "admin_token_file": str(token_file),
                    "listen_admin": "",
                    "listen_dashboard": f"{LOOPBACK}:{stack.ports['dashboard']}",
                }
        with ThreadPoolExecutor(len(stacks)) as pool:  # independent: start them together,
            for started in [pool.submit(_start_but_envoy, s) for s in stacks.values()]:
                started.result()
        for stack in stacks.values():  # but not the Envoys: two starting at once may pick
            stack.start_envoy()  # the same dynamic base id, and one hot-restarts the other
        gateways = {
            name: ServedGateway(
                name,
                stack.url,
                stack.redis_url,
                str(stack.config_path),
                stack.gateway_identity.public_key,
                pay_to[name],
                f"http://{LOOPBACK}:{stack.ports['dashboard']}" if spec.dashboard else "",
                str(stack.dir / "admin.token") if spec.dashboard else "",
            )
            for name, stack in stacks.items()
        }
        for name, amount in spec.credit.items():
            gateways[name].credit(agent.public_key, amount)
        for name, wallet in specialists.items():
            gateways[spec.chained[name][0]].credit(wallet.public_key, spec.chained_credit)
        keys = {name: wallet.public_key for name, wallet in specialists.items()}
        yield World(gateways, agent.identity.seed_text, evm_key, rpc_url, token, keys)


def run(spec: Spec, lane: Callable[[World, bool], Mapping[str, Any]]) -> None:
    """An example's entry point: `--info FILE` uses a running world, else one is started;
    `--short` is the test suite's quick mode. The last line printed is the lane's figures,
    as JSON (amounts: decimal strings)."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__)
    parser.add_argument(
        "--info", type=Path, help="a world's JSON (lanes.World.save, or x402 demo --serve --info)"
    )
    parser.add_argument("--short", action="store_true", help="a few requests, for tests")
    args = parser.parse_args()
    if args.info is not None:
        figures = lane(World.load(args.info, spec), args.short)
    else:
        print("starting the lane's gateways on loopback…", flush=True)
        with start(spec) as world:
            figures = lane(world, args.short)
    print(json.dumps(figures, sort_keys=True), flush=True)


def _route(method: str, path: str, price: str = "", **more: Any) -> dict[str, Any]:
    return {"method": method, "path": path, **({"price": price} if price else {}), **more}


# The worlds of the examples in examples/ (and of `x402 demo --lane`).
SPECS: dict[str, Spec] = {
    # Three operators, three gateways; the agent funds itself at each one on chain.
    "content": Spec(
        gateways={
            "text": {"write": _route("POST", "/api/v1/text/generate", "0.02")},
            "image": {"draw": _route("POST", "/api/v1/image/generate", "0.05")},
            "voice": {"speak": _route("POST", "/api/v1/voice/synthesize", "0.03")},
        },
        chain=True,
        mint=10_000_000,  # 10 USDC
    ),
    # A code-generation agent priced per token, then a security audit at a flat price.
    "per-token": Spec(
        gateways={
            "codegen": {
                "generate": _route(
                    "POST",
                    "/api/v1/llm/generate",
                    unit="token",
                    unit_price="0.00001",
                    max_units=4000,
                )
            },
            "audit": {"audit": _route("POST", "/api/v1/audit/security", "0.05")},
        },
        credit={"codegen": "2", "audit": "2"},
    ),
    # A data API priced per row returned; a failed page is released, not charged.
    "per-row": Spec(
        gateways={
            "data": {
                "rows": _route(
                    "GET", "/api/v1/data/rows", unit="row", unit_price="0.001", max_units=100
                )
            }
        },
        credit={"data": "1"},
    ),
    # A market-signal route paid with channel vouchers.
    "channel": Spec(
        gateways={"market": {"signal": _route("GET", "/api/v1/market/signal/{symbol}", "0.0005")}},
        credit={"market": "10"},
    ),
    # Micro-cent scans behind two gateways.
    "ci": Spec(
        gateways={
            "scanner": {"scan": _route("POST", "/api/v1/scan/vulnerabilities", "0.000004")},
            "licenses": {"check": _route("POST", "/api/v1/scan/licenses", "0.000002")},
        },
        credit={"scanner": "0.001", "licenses": "0.001"},
    ),
    # A coordinator dispatching to specialists (three providers), each paying an API below.
    "swarm": Spec(
        gateways={
            "research": {"task": _route("POST", "/api/v1/tasks/research", "0.02")},
            "writer": {"task": _route("POST", "/api/v1/tasks/write", "0.05")},
            "reviewer": {"task": _route("POST", "/api/v1/tasks/review", "0.01")},
            "search": {"search": _route("GET", "/api/v1/search", "0.002")},
            "llm": {"complete": _route("GET", "/api/v1/llm/complete", "0.004")},
        },
        credit={"research": "1", "writer": "1", "reviewer": "1"},
        chained={
            "research": ("search", "/api/v1/search"),
            "writer": ("llm", "/api/v1/llm/complete"),
            "reviewer": ("search", "/api/v1/search"),
        },
        dashboard=True,
    ),
    # The gateway the guides' code blocks run against (docs/guides, tests/test_guides.py).
    "guides": Spec(
        gateways={
            "api": {
                "atlas": _route("GET", "/api/v1/agent/pay-api/atlas", "0.25"),
                "trade-verify": _route("GET", "/api/v1/trade/verify/{trade_id}", "0.01"),
                "signal": _route("GET", "/api/v1/market/signal/{symbol}", "0.0005"),
                "rows": _route(
                    "GET", "/api/v1/data/rows", unit="row", unit_price="0.001", max_units=100
                ),
            }
        },
        credit={"api": "5"},
        chain=True,
        mint=10_000_000,
    ),
    # An unmodified MCP server's tools, priced per call at the edge (the agent pays with
    # its prepaid wallet through the official MCP client and x402.mcp's session).
    "mcp": Spec(
        gateways={
            "api": {
                "tools": _route(
                    "POST",
                    "/mcp",
                    mcp={"tools": {"get_weather": "0.01", "deep_research": "0.25"}},
                )
            }
        },
        credit={"api": "1"},
        mcp=True,
    ),
    # A day of paid calls, settled, exported and verified.
    "compliance": Spec(
        gateways={
            "api": {
                "atlas": _route("GET", "/api/v1/agent/pay-api/atlas", "0.25"),
                "trade-verify": _route("GET", "/api/v1/trade/verify/{trade_id}", "0.01"),
            }
        },
        credit={"api": "5"},
    ),
}


# -- x402 demo --lane NAME: one example, narrated -----------------------------------------
EXAMPLES = {
    "content": "content_agent.py",
    "per-token": "per_token_audit.py",
    "swarm": "swarm_coordinator.py",
    "channel": "trading_bot.py",
    "per-row": "per_row_pipeline.py",
    "ci": "ci_scanner.py",
    "compliance": "compliance_export.py",
    "mcp": "mcp_agent.py",
}


def load_example(name: str) -> Any:
    """The program examples/<file>.py of lane `name`, imported (its `lane` and `__doc__`)."""
    import importlib.util

    from sidecar.core.errors import X402Error

    path = EXAMPLES_DIR / EXAMPLES[name]
    spec = importlib.util.spec_from_file_location(f"x402_example_{name.replace('-', '_')}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise X402Error(f"{path} not found beside the lanes' harness")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def narrate(name: str, console: Any, short: bool = False) -> int:
    """Start lane `name`'s world, show it, run its program, show its figures; 0 if it ran."""
    import contextlib

    from rich import box
    from rich.panel import Panel
    from rich.table import Table

    example = load_example(name)
    console.print(Panel(str(example.__doc__).strip(), title=f"[bold]x402 demo --lane {name}"))
    with ExitStack() as running:
        with console.status("starting the lane's gateways on loopback…"):
            world = running.enter_context(start(SPECS[name]))
        table = Table("gateway", "URL", "receipt key", "on-chain payee", box=box.SIMPLE)
        for gateway in world.gateways.values():
            table.add_row(gateway.name, gateway.url, gateway.key[:16] + "…", gateway.pay_to)
        console.print(table)
        workdir = running.enter_context(tempfile.TemporaryDirectory(prefix="x402-lane-"))
        running.enter_context(contextlib.chdir(workdir))  # what the lane writes goes away
        try:
            figures = example.lane(world, short)
        except Exception as exc:  # reported, then a non-zero exit
            console.print(f"[red]✗[/red] lane {name}: {exc.__class__.__name__}: {exc}")
            return 1
    console.print_json(json.dumps(figures, sort_keys=True))
    console.print(f"[green]✓[/green] lane {name} ran; the figures above are its own")
    return 0
