"""The house's rules of size and shape, checked on every run (docs/architecture.md):
no import cycle among `sidecar` modules (imports inside functions count), no module over
500 lines nor function over 80 (generated code aside),
one module per payment kind under server/schemes/, and a wheel that carries neither the
examples' harness nor a module reading the repository's paths. (Imports pointing down the
house, and Redis only in the ledger: test_architecture.py.)
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.packaging import source_tree

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sidecar"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80
PAYMENT_KINDS = ("prepaid", "channel", "exact")
# A module finding files by climbing from its own place: in a wheel, the repository's
# directories are not there (package data is read with importlib.resources).
REPOSITORY_PATH = re.compile(r"Path\(__file__\)|dirname\(__file__\)")


def modules() -> dict[str, Path]:
    """Dotted name → file of every sidecar module but the generated gRPC code."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_pb2" in path.name:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The sidecar modules `name` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan), less a
    package whose `__init__` re-exports a child that imports the package's siblings."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_among_sidecar_modules() -> None:
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_and_functions_stay_small() -> None:
    too_big = []
    for path in modules().values():
        text = path.read_text(encoding="utf-8")
        if (lines := text.count("\n")) > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}()")
    assert too_big == []


def test_one_module_per_payment_kind() -> None:
    from sidecar.server.schemes.registry import Schemes

    schemes = PACKAGE / "server" / "schemes"
    for kind in PAYMENT_KINDS:
        assert (schemes / f"{kind}.py").is_file(), kind
    registry = (schemes / "registry.py").read_text(encoding="utf-8")
    for kind in PAYMENT_KINDS:  # each registered once, in the one registry
        assert f"sidecar.server.schemes.{kind}" in registry or f"schemes.{kind} " in registry
    assert Schemes.__module__ == "sidecar.server.schemes.registry"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source_tree(tmp_path_factory.mktemp("tree")))],
        check=True, capture_output=True,
    )  # fmt: skip
    [built] = out.glob("x402_sidecar-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_holds_no_examples_harness_nor_repository_reads(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert [n for n in names if n.startswith("examples") or "/examples/" in n] == []
    reads = [
        name
        for name in names
        if name.endswith(".py") and REPOSITORY_PATH.search(wheel.read(name).decode("utf-8"))
    ]
    assert reads == []


def test_the_wheel_ships_the_compiled_anchor_contract(wheel: zipfile.ZipFile) -> None:
    """The runtime deploys and calls BatchAnchor from package data, with no compiler."""
    names = set(wheel.namelist())
    assert "sidecar/ledger/contracts/BatchAnchor.json" in names
    assert "sidecar/ledger/contracts/BatchAnchor.sol" in names
    assert "sidecar/tools/testchain/UptoTestDoubles.json" in names  # the test chain's upto
