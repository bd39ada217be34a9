"""Key files and key encodings."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sidecar.core.errors import ConfigError
from sidecar.core.identity import (
    Identity,
    b64url_decode,
    read_secret,
    verify,
    verify_key,
    write_secret,
)


def test_key_file_round_trip_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    identity = Identity.generate()
    identity.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public_key == identity.public_key and loaded.kid == identity.kid
    with pytest.raises(FileExistsError):
        identity.save(path)  # never overwrites a key


def test_signatures_verify_only_for_their_message() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"message")
    key = verify_key(identity.public_key)
    assert verify(key, b"message", signature)
    assert not verify(key, b"other", signature)
    assert not verify(key, b"message", "!!!")


@pytest.mark.parametrize("text", ["AAAA=", "AA+A", "A", "AAB"])
def test_b64url_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


def test_repr_hides_the_private_key() -> None:
    identity = Identity.generate()
    assert identity.seed_text not in repr(identity)


def test_bad_key_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_secret(path, "not a key")
    with pytest.raises(ConfigError, match="not an Ed25519 private key"):
        Identity.load(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_every_key_and_secret_file_is_the_owners_only(tmp_path: Path, mode: int) -> None:
    """One rule for agents' and operators' files: group or other bits are refused, naming
    the file and the fix; 0600 and 0400 pass."""
    key = tmp_path / "agent.key"
    Identity.generate().save(key)
    key.chmod(mode)
    for load in (Identity.load, lambda p: read_secret(p, "config invoice_secret_file")):
        with pytest.raises(ConfigError) as refused:
            load(key)
        assert f"has mode {mode:04o}" in str(refused.value)
        assert str(refused.value).endswith(f"chmod 600 {key}")
    key.chmod(0o400)
    assert Identity.load(key).public_key


def test_an_empty_key_file_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    write_secret(empty, "\n")
    with pytest.raises(ConfigError, match=f"key file: {empty} is empty"):
        Identity.load(empty)
