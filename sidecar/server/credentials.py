"""What the gateway shows a facilitator that wants credentials (config `facilitators`,
docs/configuration.md): headers read from a file, or a Coinbase CDP API key whose JWT is
minted for each request (`cdp-sdk`'s own helper, the optional `cdp` extra).

Either file must be private to the gateway (mode 0600 or stricter: `check_private`): a
missing or group/world-readable one stops start-up naming it. Each use looks at the file
(one stat) and reads it again when it changed, so a rotated token or key needs no restart;
a file that became unusable refuses the facilitator (`CredentialsUnusable`: the request is
not sent) rather than keep the old secret. Nothing here logs or quotes a secret: errors
name the file and the line, never a value.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Protocol
from urllib.parse import urlsplit

from sidecar.core.errors import ConfigError
from sidecar.core.identity import read_secret

# RFC 9110 field-name token; a value is anything printable on one line.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers the HTTP client owns: a file cannot set them.
RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection"})
CDP_SOURCE = "x402"  # what the CDP SDK's own facilitator config sends as its source


class CredentialsUnusable(Exception):
    """A credentials file that was fine at start cannot be used now (removed, readable by
    others, malformed): the message names the file, never its content."""


class Credentials(Protocol):
    def headers(self, method: str, url: str) -> dict[str, str]:
        """The headers for one request (`url`: the full facilitator URL it goes to)."""
        ...


class NoCredentials:
    def headers(self, method: str, url: str) -> dict[str, str]:
        return {}


class _WatchedFile:
    """A private file read at start (a ConfigError if it is unusable) and again whenever
    its inode, size, mtime or mode changed."""

    def __init__(self, path: str, what: str) -> None:
        self.path, self.what = path, what
        self._stamp = self._stat()
        self._load()

    def _stat(self) -> tuple[int, ...]:
        try:
            info = os.stat(self.path)
        except OSError:
            return ()
        return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode)

    def _load(self) -> None:
        raw = read_secret(self.path, self.what)  # the mode check, then the bytes
        self.parse(raw)

    def parse(self, raw: bytes) -> None:
        raise NotImplementedError

    def current(self) -> None:
        """Read the file again if it changed since the last look."""
        stamp = self._stat()
        if stamp == self._stamp:
            return
        try:
            self._load()
        except ConfigError as exc:
            raise CredentialsUnusable(str(exc)) from None
        self._stamp = stamp


class HeadersFile(_WatchedFile):
    """`Name: value` lines (blank lines and `#` comments skipped), sent with every request
    to the facilitator, e.g. `Authorization: Bearer …`."""

    _headers: dict[str, str]

    def parse(self, raw: bytes) -> None:
        self._headers = parse_headers(raw, f"{self.what}: {self.path}")

    def headers(self, method: str, url: str) -> dict[str, str]:
        self.current()
        return dict(self._headers)


def parse_headers(raw: bytes, where: str) -> dict[str, str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or HEADER_NAME.fullmatch(name) is None or not value.isprintable():
            raise ConfigError(f"{where}: line {number} is not `Name: value`")
        if not value:
            raise ConfigError(f"{where}: line {number} ({name}) has no value")
        if name.lower() in RESERVED:
            raise ConfigError(f"{where}: line {number}: {name} is set by the HTTP client")
        headers[name] = value
    if not headers:
        raise ConfigError(f"{where}: no `Name: value` line")
    return headers


class CdpApiKey(_WatchedFile):
    """A CDP API key as the CDP portal downloads it (JSON: `id` — or `name` for older keys —
    and `privateKey`, Ed25519 base64 or EC PEM): each request gets its own short-lived JWT
    from `cdp-sdk`'s `generate_jwt` (EdDSA or ES256 by the key, `uris` naming the method,
    host and path, 120 s), with the `Correlation-Context` its `get_auth_headers` sends
    (made once: it reads the package's metadata, ~2.5 ms, where the JWT costs ~0.2 ms).

    `cdp-sdk` imports its whole client with it (seconds, ~150 MB): it is imported only
    when a facilitator has a `cdp_api_key_file`, once before the workers fork."""

    key_id: str
    secret: str

    def __init__(self, path: str, what: str) -> None:
        try:
            from cdp.auth.utils import http as cdp_http
            from cdp.auth.utils import jwt as cdp_jwt
        except ImportError:
            raise ConfigError(
                f"{what}: CDP API keys need the cdp extra: pip install 'x402-sidecar[cdp]'"
            ) from None
        self._http: Any = cdp_http
        self._jwt: Any = cdp_jwt
        self._correlation = ""
        super().__init__(path, what)

    def parse(self, raw: bytes) -> None:
        where = f"{self.what}: {self.path}"
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: not a CDP API key file (JSON with id and privateKey)")
        key_id, secret = data.get("id") or data.get("name"), data.get("privateKey")
        if not isinstance(key_id, str) or not key_id or not isinstance(secret, str):
            raise ConfigError(f"{where}: a CDP API key file needs `id` and `privateKey`")
        try:  # cdp-sdk's own headers once: a key that cannot sign fails now, not at a payment
            found = self._http.get_auth_headers(
                self._http.GetAuthHeadersOptions(
                    api_key_id=key_id, api_key_secret=secret, **_request("GET", CDP_PROBE),
                    source=CDP_SOURCE,
                )
            )  # fmt: skip
        except ValueError:
            raise ConfigError(f"{where}: privateKey is not an Ed25519 or EC key") from None
        self.key_id, self.secret = key_id, secret
        self._correlation = str(found.get("Correlation-Context", ""))

    def headers(self, method: str, url: str) -> dict[str, str]:
        self.current()
        options = self._jwt.JwtOptions(
            api_key_id=self.key_id, api_key_secret=self.secret, **_request(method, url)
        )
        try:
            token = self._jwt.generate_jwt(options)
        except ValueError:
            raise CredentialsUnusable(f"{self.what}: {self.path}: cannot sign a JWT") from None
        found = {"Authorization": f"Bearer {token}"}
        if self._correlation:
            found["Correlation-Context"] = self._correlation
        return found


CDP_PROBE = "https://api.cdp.coinbase.com/platform/v2/x402/supported"


def _request(method: str, url: str) -> dict[str, str]:
    """cdp-sdk's request fields for `url`. The host keeps its scheme: cdp-sdk urlparses
    host + path, and a bare `host:port` would read as a scheme (for CDP's own host the
    `uris` claim is the same as the SDK's facilitator config makes)."""
    parts = urlsplit(url)
    return {
        "request_method": method,
        "request_host": f"{parts.scheme}://{parts.netloc}",
        "request_path": parts.path or "/",
    }


def credentials(headers_file: str, cdp_api_key_file: str, what: str) -> Credentials:
    """The credentials of one facilitator (`what`: its config key, for errors)."""
    if headers_file:
        return HeadersFile(headers_file, f"{what}.headers_file")
    if cdp_api_key_file:
        return CdpApiKey(cdp_api_key_file, f"{what}.cdp_api_key_file")
    return NoCredentials()
