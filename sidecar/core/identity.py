"""Ed25519 identities: the gateway's signing key and an agent's wallet key, one format."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from nacl.bindings import crypto_sign, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from sidecar.core.errors import ConfigError, KeySetError


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding, the encoding of keys and signatures."""
    padded = text + "=" * (-len(text) % 4)
    raw = base64.urlsafe_b64decode(padded.encode("ascii"))
    if b64url(raw) != text:  # reject non-canonical encodings (malleability)
        raise ValueError("non-canonical base64url")
    return raw


def key_id(public_key: bytes, prefix: str = "gw_") -> str:
    """A short, stable name for a public key: the gateway's `payee` and receipts' `kid`."""
    return prefix + b64url(hashlib.sha256(public_key).digest()[:12])


def write_secret(path: str | os.PathLike[str], text: str) -> None:
    """Create `path` holding `text`, mode 0600 from the first byte (no window where others
    can read it); FileExistsError rather than overwrite a secret."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def check_private(path: str | os.PathLike[str], what: str) -> None:
    """The one rule for every key and secret file, agents' and operators' alike: a regular
    file that only its owner may read or write (mode 0600, or 0400); a KeySetError
    (key_unreadable, key_mode) naming the file and the fix otherwise.

    One exception, how Kubernetes mounts a Secret for a pod's fsGroup (the chart's): a
    file this process does not own, that its group may only read and others not at all
    (0440, owned by root)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise KeySetError("key_unreadable", f"{what}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeySetError("key_unreadable", f"{what}: {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    mounted = info.st_uid != os.geteuid() and not mode & 0o037
    if mode & 0o077 and not mounted:
        raise KeySetError(
            "key_mode",
            f"{what}: {path} has mode {mode:04o}: others may read it; "
            f"make it the owner's only: chmod 600 {path}",
        )


def read_secret(path: str | os.PathLike[str], what: str, min_bytes: int = 1) -> bytes:
    """A secret file's content, stripped, once `check_private` allows it. Errors start
    with `what` (e.g. "config admin_token_file") and name the path, never the content: a
    malformed secret is still a secret."""
    check_private(path, what)
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{what}: {path} is empty")
    if len(secret) < min_bytes:
        raise ConfigError(f"{what}: {path}: the secret must be at least {min_bytes} bytes")
    return secret


def read_evm_key(path: str | os.PathLike[str], what: str) -> str:
    """The 0x-prefixed hex private EVM key in `path` (an operator's or a facilitator's),
    once `check_private` allows the file; the message never quotes the content."""
    key = read_secret(path, what).decode("utf-8", errors="replace").removeprefix("0x")
    if len(key) != 64 or any(c not in string.hexdigits for c in key):
        raise ConfigError(f"{what} {path} does not hold a 32-byte hex private key")
    return "0x" + key


@dataclass(frozen=True)
class Identity:
    """A private Ed25519 key. The key file holds the 32-byte seed as base64url text."""

    signing_key: SigningKey = field(repr=False)

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed_text(cls, text: str, source: str = "key") -> Identity:
        try:
            seed = b64url_decode(text.strip())
        except (ValueError, UnicodeEncodeError):
            seed = b""
        if len(seed) != 32:
            # Never echo the content: it is a secret.
            raise ConfigError(f"{source}: not an Ed25519 private key (expected 32-byte base64url)")
        return cls(SigningKey(seed))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        text = read_secret(path, "key file").decode("utf-8", errors="replace")
        return cls.from_seed_text(text, source=f"key file {path}")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the seed to a new file of mode 0600 (see `write_secret`)."""
        write_secret(path, self.seed_text + "\n")

    @property
    def seed_text(self) -> str:
        return b64url(bytes(self.signing_key))

    @cached_property  # on every receipt: hashed once, not per request
    def public_key(self) -> str:
        """base64url of the raw 32-byte public key: an agent's `payer` id."""
        return b64url(bytes(self.signing_key.verify_key))

    @cached_property
    def kid(self) -> str:
        return key_id(bytes(self.signing_key.verify_key))

    @cached_property
    def _secret(self) -> bytes:
        """libsodium's 64-byte secret key (seed + public key), derived once."""
        return crypto_sign_seed_keypair(bytes(self.signing_key))[1]

    def sign(self, message: bytes) -> str:
        # libsodium directly: SigningKey.sign wraps every signature in a SignedMessage.
        return b64url(crypto_sign(message, self._secret)[:64])


def load_signing_key(path: str | os.PathLike[str], what: str) -> Identity:
    """A gateway signing key file that `check_private` allows, holding an Ed25519 seed;
    else a KeySetError naming `what`."""
    check_private(path, what)
    try:
        return Identity.load(path)
    except ConfigError as exc:
        raise KeySetError("key_malformed", f"{what}: {exc}") from None


@dataclass(frozen=True)
class KeySet:
    """The gateway's signing keys. The current key names the payee of new invoices and
    signs new receipts; a previous key (kept after a rotation) is still a payee agents may
    pay, signs the receipts of what was paid to it, and re-signs them at settlement, so
    every receipt verifies with the published set ({kid: public key})."""

    current: Identity
    previous: tuple[Identity, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for key in self.all:
            if key.kid in seen:
                raise KeySetError("duplicate_kid", f"signing keys: {key.kid} appears twice")
            seen.add(key.kid)

    @property
    def all(self) -> tuple[Identity, ...]:
        return (self.current, *self.previous)

    @cached_property
    def by_kid(self) -> dict[str, Identity]:
        return {key.kid: key for key in self.all}

    @cached_property
    def kids(self) -> frozenset[str]:
        return frozenset(self.by_kid)

    def signer(self, kid: str) -> Identity:
        """The key whose id is `kid` (a payee of this gateway); KeyError if none is."""
        return self.by_kid[kid]

    def public_keys(self) -> dict[str, str]:
        """{kid: base64url public key}: what verifies every receipt of this gateway."""
        return {key.kid: key.public_key for key in self.all}


def public_key_set(keys: Iterable[str]) -> dict[str, str]:
    """Base64url public keys → {kid: key}; ValueError naming the first that is not one."""
    found = {}
    for text in keys:
        text = text.strip()
        verify_key(text)
        found[key_id(b64url_decode(text))] = text
    return found


def published_key_set(document: Mapping[str, object]) -> dict[str, str]:
    """The key set of a discovery document (`keys`: [{kid, public_key}]); ValueError if a
    key is malformed or its kid is not the id of its public key."""
    entries = document.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ValueError("the document has no `keys` list")
    found: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("public_key"), str):
            raise ValueError("a `keys` entry has no public_key")
        [(kid, key)] = public_key_set([entry["public_key"]]).items()
        if entry.get("kid") != kid:
            raise ValueError(f"key {entry.get('kid')!r} is not the id of its public key")
        found[kid] = key
    return found


def parse_key_set(text: str) -> dict[str, str]:
    """A public key, or a discovery document (JSON) and its whole key set; ValueError."""
    if not text.lstrip().startswith("{"):
        return public_key_set([text])
    document = json.loads(text)
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    return published_key_set(document)


def verify_key(public_key: str) -> VerifyKey:
    """Parse a base64url public key; ValueError if it is not exactly 32 canonical bytes."""
    raw = b64url_decode(public_key)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return VerifyKey(raw)


def verify(key: VerifyKey, message: bytes, signature: str) -> bool:
    try:
        raw = b64url_decode(signature)
    except ValueError:
        return False
    if len(raw) != 64:
        return False
    try:
        key.verify(message, raw)
    except BadSignatureError:
        return False
    return True
