"""`x402 load`: push priced routes with many simulated agents and count the challenge loops
the stack clears.

Each agent has its own wallet, registered and credited in the ledger before the run. An
agent's loop is the real protocol: GET → 402 with an invoice → sign → retry → 200 with a
receipt (or, with `direct`, one signed request from the price list). Every status that
is not the expected one is counted under its reason, so a summary always adds up:
attempted loops = cleared loops + errors.

The generator must not be what limits the run. The loops run in several processes
(default: one per core), each an event loop (uvloop where installed) driving raw HTTP/1.1
keep-alive connections whose responses llhttp parses (httptools): one process on httpx
spent ~2.5 ms of CPU per loop and saturated its core while the stack idled. The parent
discovers the price list, funds the agents, starts every process on one clock, shows the
progress and merges what each process measured, its own CPU included.
"""

from sidecar.tools.load.plan import (
    DIRECT_CEILING,
    DIRECT_CEILING_PER_AGENT,
    LoadConfig,
    Plan,
    Stats,
    Target,
    generator_cpu,
    parse_duration,
    percentiles,
    presign_count,
    split,
)
from sidecar.tools.load.runner import Runner, discover, fund_agents, main, resolve, run

__all__ = [
    "DIRECT_CEILING",
    "DIRECT_CEILING_PER_AGENT",
    "LoadConfig",
    "Plan",
    "Runner",
    "Stats",
    "Target",
    "discover",
    "fund_agents",
    "generator_cpu",
    "main",
    "parse_duration",
    "percentiles",
    "presign_count",
    "resolve",
    "run",
    "split",
]
