"""Compile protos/admin.proto into sidecar/server/admin_pb2.py, .pyi and admin_pb2_grpc.py.

    .venv/bin/python protos/generate.py

The generated files are committed (small, and no build step at install time). The
include path maps this directory to the package name, so the generated gRPC module
imports `from sidecar.server import admin_pb2` and works inside the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    protos = ROOT / "protos"
    well_known = Path(protoc.__file__).parent / "_proto"
    return protoc.main(
        [
            "grpc_tools.protoc",
            f"-Isidecar/server={protos}",
            f"-I{well_known}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            "sidecar/server/admin.proto",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
