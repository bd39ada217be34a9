"""Certificates for TLS tests, made with the openssl command line: a CA, a server
certificate for 127.0.0.1 and a client certificate, all signed by that CA."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "ca") -> None:
    """`name`.crt and `name`.key: a self-signed CA."""
    directory.mkdir(parents=True, exist_ok=True)
    key, crt = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", key, "-out", crt, "-days", "2", "-subj", f"/CN=x402 test {name}"),
    )


def issue(directory: Path, name: str, ca: str = "ca") -> None:
    """`name`.crt and `name`.key signed by the CA `ca`, valid for 127.0.0.1 and localhost
    (as a server and as a client)."""
    key, csr, crt = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", key, "-out", csr, "-subj", f"/CN={name}"),
    )
    _openssl(
        *("x509", "-req", "-in", csr, "-CA", directory / f"{ca}.crt"),
        *("-CAkey", directory / f"{ca}.key", "-CAcreateserial", "-out", crt, "-days", "2"),
        *("-extfile", extensions),
    )
    key.chmod(0o600)


def redis_tls_files(directory: Path) -> Path:
    """What Stack(redis_tls=...) needs, and a second CA (other.crt) that signed nothing."""
    make_ca(directory)
    issue(directory, "redis")
    issue(directory, "client")
    make_ca(directory, "other")
    return directory
