"""Compiles the project's Solidity (the batch anchor, `sidecar/ledger/contracts/`) with npm
`solc` (solc-js, run by node) into the artifact the wheel ships, so the runtime needs no
compiler: `python -m sidecar.tools.contracts > sidecar/ledger/contracts/BatchAnchor.json`
(`make generate`); with the argument `upto`, the test chain's Permit2 and upto proxy
(sidecar/tools/permit2.py). The same source, settings and compiler give the same bytes,
which a test checks against the committed artifact.

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
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from sidecar.core.errors import ToolMissing, X402Error
from sidecar.tools import permit2
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


def compile_solidity(
    sources: Mapping[str, str], contracts: Sequence[str], settings: Mapping[str, Any]
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Compile `sources` (file name → Solidity text) with solc-js: the compiler's version
    and, for each of `contracts` (as "File.sol:Name"), solc's output for it (the selection
    `settings["outputSelection"]` names). solc's errors raise X402Error."""
    node = shutil.which("node")
    if node is None:
        raise ToolMissing("node not found: solc-js runs on node")
    standard = {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sources.items()},
        "settings": settings,
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
    compiled = {}
    for contract in contracts:
        file, _, name = contract.partition(":")
        compiled[contract] = result["output"]["contracts"][file][name]
    return str(result["version"]), compiled


def compile_anchor() -> dict[str, Any]:
    """The artifact of BatchAnchor: ABI, creation and runtime code, selectors, and what made
    them (compiler, settings, the source's SHA-256)."""
    text = source()
    version, found = compile_solidity({SOURCE: text}, [f"{SOURCE}:{CONTRACT}"], SETTINGS)
    compiled = found[f"{SOURCE}:{CONTRACT}"]
    return {
        "contractName": CONTRACT,
        "compiler": f"solc-js {version}",
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


def compile_upto_test_doubles() -> dict[str, Any]:
    """The artifact of the test chain's Permit2 and upto proxy (sidecar/tools/permit2.py):
    each canonical address's runtime code, and what made it."""
    texts = permit2.sources()
    version, found = compile_solidity(texts, [name for name, _ in permit2.PLACED], permit2.SETTINGS)
    return {
        "compiler": f"solc-js {version}",
        "settings": {k: v for k, v in permit2.SETTINGS.items() if k != "outputSelection"},
        "sourceSha256": hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest(),
        "runtime": {
            address: "0x" + found[name]["evm"]["deployedBytecode"]["object"]
            for name, address in permit2.PLACED
        },
    }


def render_upto_test_doubles() -> str:
    return json.dumps(compile_upto_test_doubles(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    upto = sys.argv[1:] == ["upto"]
    sys.stdout.write(render_upto_test_doubles() if upto else render())
