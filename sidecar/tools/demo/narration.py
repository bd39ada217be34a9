"""How the demo tells its story: the narration (steps, checks, summary) and the recorder
of every HTTP exchange the SDK makes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.panel import Panel

from sidecar.core import protocol


@dataclass
class Exchange:
    """One HTTP request the agent's client sent, and what came back."""

    method: str
    path: str
    proof: dict[str, Any] | None
    status: int = 0
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class Recorder:
    """httpx event hooks: every request the SDK sends, including its retries."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def on_request(self, request: httpx.Request) -> None:
        header = request.headers.get("x-payment")
        proof = protocol.decode_header(header) if header else None
        self.exchanges.append(Exchange(request.method, request.url.path, proof))

    def on_response(self, response: httpx.Response) -> None:
        response.read()
        exchange = self.exchanges[-1]
        exchange.status = response.status_code
        exchange.headers = dict(response.headers)
        try:
            exchange.body = response.json()
        except ValueError:
            exchange.body = response.text

    @contextmanager
    def call(self) -> Iterator[list[Exchange]]:
        """The exchanges of one SDK call."""
        start = len(self.exchanges)
        exchanges: list[Exchange] = []
        try:
            yield exchanges
        finally:
            exchanges.extend(self.exchanges[start:])


class Narration:
    """The demo's voice: a titled panel per step, a checked result per claim, and the
    summary of every result at the end."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.results: list[tuple[str, bool, str]] = []

    def step(self, title: str, text: str = "") -> None:
        self.console.print()
        self.console.print(
            Panel(
                text or title,
                title=f"[bold]{title}",
                title_align="left",
                box=box.ROUNDED,
                expand=False,
            )
        )

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok, detail))
        mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
        self.console.print(f"{mark} {name}" + (f" — {detail}" if detail else ""))
        return ok

    def attempt(self, name: str, action: Callable[[], None]) -> None:
        """Run one step; an unexpected exception fails it instead of ending the demo."""
        try:
            action()
        except Exception as exc:  # the demo reports it, then exits non-zero
            self.check(name, False, f"{exc.__class__.__name__}: {exc}")

    def summary(self, skipped: str = "") -> int:
        failed = [name for name, ok, _ in self.results if not ok]
        self.console.print()
        if failed:
            self.console.print(
                Panel(
                    f"[red]{len(failed)} of {len(self.results)} steps "
                    f"misbehaved: {', '.join(failed)}",
                    expand=False,
                )
            )
            return 1
        skipped = f"\n[yellow]The on-chain lanes were skipped: {skipped}[/]" if skipped else ""
        self.console.print(
            Panel(
                f"[green]All {len(self.results)} steps behaved as expected.[/]{skipped}"
                "\nNext: x402 demo --serve, then pay with your own agent.",
                expand=False,
            )
        )
        return 0
