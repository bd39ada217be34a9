"""The `x402` command line (console script `x402 = sidecar.tools.cli:main`). Errors are one
line, no traceback; `x402 --help` lists the commands by who uses them."""

from sidecar.tools.cli import agent, audit, developer, operator
from sidecar.tools.cli.base import main

__all__ = ["agent", "audit", "developer", "main", "operator"]
