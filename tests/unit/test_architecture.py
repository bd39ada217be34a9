"""The house by audience: core < agent, ledger < server < tools; imports point down only.

docs/architecture.md draws the same picture; this test keeps it true. The tests have a
house too: shared helpers in tests/support, fixtures alone in conftest.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sidecar"
TESTS = ROOT / "tests"
# What each package may import from the others (and itself).
ALLOWED = {
    "core": {"core"},
    "agent": {"core", "agent"},
    "ledger": {"core", "ledger"},
    "server": {"core", "ledger", "server"},
    "tools": {"core", "agent", "ledger", "server", "tools"},
}
# The base install is the agent SDK: importing it loads none of the gateway's dependencies.
SERVER_ONLY = ("grpc", "redis", "hiredis", "envoy", "prometheus_client", "structlog", "yaml")
# The `evm` extra (x402 `exact` payments, top-ups) loads when an EVM key first signs.
EVM_ONLY = ("eth_account", "eth_keys", "eth_utils", "web3", "x402", "pydantic")


def sidecar_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `sidecar.…` import in a file, lazy ones included."""
    return [(line, m) for line, m in imports(path) if m.startswith("sidecar.")]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, lazy ones included; `from a import b`
    counts as `a.b` when `a` is a package of ours, a relative import keeps its dots."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            modules = [module]
            if module in ("sidecar", "tests"):
                modules = [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, m) for m in modules]
    return found


def modules_of(package: str) -> list[Path]:
    return sorted(p for p in (PACKAGE / package).rglob("*.py") if "_pb2" not in p.name)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_house(package: str) -> None:
    upward = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in modules_of(package)
        for line, module in sidecar_imports(path)
        if module.split(".")[1] not in ALLOWED[package]
    ]
    assert upward == []


def test_every_module_lives_in_a_package() -> None:
    """Only the package marker stays at the top."""
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]


def test_the_boundary_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from sidecar.ledger.accounts import Ledger\nfrom sidecar import server\n")
    assert [m for _line, m in sidecar_imports(module)] == [
        "sidecar.ledger.accounts",
        "sidecar.server",
    ]


REDIS_CLIENTS = ("redis", "hiredis")
# The ledger's two clients: attributes of `Ledger` that only sidecar/ledger may touch.
LEDGER_CLIENTS = ("_redis", "_pipe")


def redis_leaks(path: Path) -> list[str]:
    """Where a module imports a Redis client or reaches into the ledger's clients."""
    found = [
        f"{line} imports {module}"
        for line, module in imports(path)
        if module.split(".")[0] in REDIS_CLIENTS
    ]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in LEDGER_CLIENTS:
            found.append(f"{node.lineno} uses .{node.attr}")
    return sorted(found)


def test_the_ledger_keeps_redis_to_itself() -> None:
    """Only sidecar/ledger talks to Redis: the rest calls the ledger's methods and sees a
    Redis failure as LedgerUnavailable, never a Redis error of its own to catch."""
    leaks = [
        f"{path.relative_to(PACKAGE.parent)}:{leak}"
        for package in sorted(set(ALLOWED) - {"ledger"})
        for path in modules_of(package)
        for leak in redis_leaks(path)
    ]
    assert leaks == []


def test_the_redis_check_sees_a_leak(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text(
        "from redis.exceptions import RedisError\nimport hiredis\n"
        "async def f(ledger):\n    return await ledger._redis.get('k'), ledger._pipe\n"
    )
    assert redis_leaks(module) == [
        "1 imports redis.exceptions",
        "2 imports hiredis",
        "4 uses ._pipe",
        "4 uses ._redis",
    ]


def test_the_sdk_loads_none_of_the_gateways_dependencies() -> None:
    probe = (
        "import sys, sidecar.agent; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "nacl" in loaded and "httpx" in loaded
    assert [name for name in SERVER_ONLY if name in loaded] == []
    assert [name for name in EVM_ONLY if name in loaded] == []


def test_the_sdks_evm_and_x402_pieces_load_only_when_used() -> None:
    """The x402 plugin module and a wallet holding an EVM key load nothing of the `evm`
    extra until a payment is signed; signing loads eth_account and x402."""
    probe = (
        "import sys\n"
        "from sidecar.agent import Wallet, EvmKey\n"
        "from sidecar.agent.x402_plugin import PrepaidEd25519\n"
        "wallet = Wallet(evm=EvmKey.generate())\n"
        "PrepaidEd25519(Wallet.generate())\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "wallet.evm.address\n"
        "after = {m.split('.')[0] for m in sys.modules}\n"
        "print(' '.join(sorted(before)))\n"
        "print(' '.join(sorted(after)))\n"
    )
    before, after = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert [name for name in EVM_ONLY if name in before.split()] == []
    assert "eth_account" in after.split()


def shared(module: str) -> bool:
    """Whether a test may import `module`: anything but conftest, a test module or a
    relative import (tests/support is the one shared place)."""
    if module.startswith(".") or module.split(".")[-1] == "conftest":
        return False
    return module.split(".")[0] != "tests" or module.split(".")[:2] == ["tests", "support"]


def test_no_test_imports_conftest_or_another_test_module() -> None:
    """Helpers live in tests/support: a test module imported by another would run its
    tests twice over and tie the two together; conftest is pytest's, not a library."""
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, module in imports(path)
        if not shared(module)
    ]
    assert bad == []


def test_conftest_defines_only_fixtures_and_hooks() -> None:
    tree = ast.parse((TESTS / "conftest.py").read_text(encoding="utf-8"))
    others = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and not node.name.startswith("pytest_")
        and not any("fixture" in ast.unparse(d) for d in node.decorator_list)
    ]
    assert others == []
    assert not [n for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign)]


def test_the_test_house_check_sees_a_test_importing_a_test(tmp_path: Path) -> None:
    module = tmp_path / "test_bad.py"
    module.write_text(
        "from tests.conftest import ROUTES\nfrom tests import test_channels\n"
        "from .test_x import y\nfrom tests.support.routes import ROUTES\n"
    )
    found = [m for _line, m in imports(module)]
    assert found == ["tests.conftest", "tests.test_channels", ".test_x", "tests.support.routes"]
    assert [shared(m) for m in found] == [False, False, False, True]
    assert not shared("conftest") and not shared("tests.unit.test_money")


def test_unit_tests_mirror_the_packages() -> None:
    """tests/unit/<package>/ holds the pure tests of sidecar/<package>/."""
    unit = TESTS / "unit"
    assert sorted(p.name for p in unit.glob("*.py")) == [
        "__init__.py",
        "test_architecture.py",
        "test_house.py",
    ]
    folders = {p.name for p in unit.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(ALLOWED)
