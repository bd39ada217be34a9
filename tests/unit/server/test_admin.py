"""The admin API's pieces that need no server (the API itself: tests/test_admin.py)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from sidecar.core.errors import ConfigError
from sidecar.core.identity import read_secret, write_secret
from sidecar.server import admin


def test_token_files_must_hold_a_real_secret(tmp_path: Path) -> None:
    short = tmp_path / "short.token"
    write_secret(short, "abc\n")
    with pytest.raises(ConfigError, match=r"admin_token_file: .* the secret must be at least 16"):
        read_secret(str(short), "config admin_token_file", admin.MIN_TOKEN_BYTES)
    good = tmp_path / "good.token"
    secret = secrets.token_urlsafe(24)
    write_secret(good, secret + "\n")
    assert read_secret(str(good), "admin_token_file", admin.MIN_TOKEN_BYTES) == secret.encode()
