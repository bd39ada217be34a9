"""`python -m sidecar.tools.cli`: the `x402` command line."""

from sidecar.tools.cli import main

main()
