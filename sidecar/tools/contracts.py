"""Compiles the project's Solidity (the batch anchor, `sidecar/ledger/contracts/`) with npm
`solc` (solc-js, run by node) into the artifact the wheel ships, so the runtime needs no
compiler: `python -m sidecar.tools.contracts > sidecar/ledger/contracts/BatchAnchor.json`
(`make generate`). The same source, settings and compiler give the same bytes, which a
test checks against the committed artifact.

solc-js is found through SOLC_JS (the package's directory; the Makefile sets it), else in
X402_TOOLS_DIR's node_modules (`make tools`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from sidecar.core.errors import ToolMissing, X402Error
from sidecar.tools.chain import tools_dir

SOLC_PACKAGE = "solc@0.8.37"
CONTRACT = "BatchAnchor"
SOURCE = f"{CONTRACT}.sol"
# Paris: no PUSH0, so the code runs on every EVM chain, old forks and L2s alike.
SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    "evmVersion": "paris",
    "outputSelection": {
        SOURCE: {
            CONTRACT: [
                "abi",
                "evm.bytecode.object",
                "evm.deployedBytecode.object",
                "evm.methodIdentifiers",
            ]
        }
    },
}
# Reads the standard JSON input on stdin, writes solc's standard JSON output.
_COMPILE = (
    "const solc = require(process.argv[1]);"
    "const input = require('fs').readFileSync(0, 'utf8');"
    "process.stdout.write(JSON.stringify({version: solc.version(), "
    "output: JSON.parse(solc.compile(input))}));"
)


def solc_dir() -> Path:
    """SOLC_JS, else node_modules/solc under X402_TOOLS_DIR."""
    given = os.environ.get("SOLC_JS")
    base = tools_dir()
    path = Path(given) if given else (base / "node_modules/solc" if base else None)
    if path is None or not (path / "package.json").is_file():
        raise ToolMissing(
            f"solc-js not found{f' at {path}' if path else ''}: set SOLC_JS or run `make tools` "
            f"(npm {SOLC_PACKAGE})"
        )
    return path


def source() -> str:
    return files("sidecar.ledger").joinpath(f"contracts/{SOURCE}").read_text("utf-8")


def compile_anchor() -> dict[str, Any]:
    """The artifact of BatchAnchor: ABI, creation and runtime code, selectors, and what made
    them (compiler, settings, the source's SHA-256)."""
    node = shutil.which("node")
    if node is None:
        raise ToolMissing("node not found: solc-js runs on node")
    text = source()
    standard = {
        "language": "Solidity",
        "sources": {SOURCE: {"content": text}},
        "settings": SETTINGS,
    }
    done = subprocess.run(
        [node, "-e", _COMPILE, str(solc_dir())],
        input=json.dumps(standard),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise X402Error(f"solc-js failed: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    errors = [e for e in result["output"].get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise X402Error("solc: " + "; ".join(e["formattedMessage"] for e in errors))
    compiled = result["output"]["contracts"][SOURCE][CONTRACT]
    return {
        "contractName": CONTRACT,
        "compiler": f"solc-js {result['version']}",
        "settings": {k: v for k, v in SETTINGS.items() if k != "outputSelection"},
        "sourceSha256": hashlib.sha256(text.encode()).hexdigest(),
        "abi": compiled["abi"],
        "bytecode": "0x" + compiled["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + compiled["evm"]["deployedBytecode"]["object"],
        "methodIdentifiers": compiled["evm"]["methodIdentifiers"],
    }


def render() -> str:
    """The artifact as committed: sorted keys, one trailing newline."""
    return json.dumps(compile_anchor(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
