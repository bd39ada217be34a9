"""Stacks beyond conftest's default one (tools/stack.py starts them)."""

from __future__ import annotations

from sidecar.tools.stack import Stack, free_port
from tests.support.routes import ENVOY_ROUTES, ROUTES

ADMIN_TOKEN = "t0ken-" + "x" * 26  # a test secret, written to the stack's admin token file


def admin_stack() -> Stack:
    """Two sidecar workers (metrics aggregate across them) and the admin API with a token;
    not started yet."""
    stack = Stack(ROUTES, envoy_routes=ENVOY_ROUTES, workers=2)
    token_file = stack.dir / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    stack.ports["admin_api"] = free_port()
    stack.settings = {
        "listen_admin": f"127.0.0.1:{stack.ports['admin_api']}",
        "admin_token_file": str(token_file),
        "anchor_file": str(stack.dir / "anchors.jsonl"),
    }
    return stack
