"""What `pip install .` builds from: the project's source alone, copied away from the
checkout, so a `build/` left by an earlier build (stale modules) never reaches a wheel."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def source_tree(into: Path) -> Path:
    """pyproject.toml, README.md and the `sidecar` package, copied under `into`."""
    tree = into / "source"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "sidecar", tree / "sidecar", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return tree
