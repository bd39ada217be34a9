"""Config `facilitators` and their credentials: a headers file (private, reloaded when it
changes) and a CDP API key's JWT, minted per request by cdp-sdk (decoded here with the
key's public half); the `GET /supported` answer as the handshake reads it."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cdp.auth.utils.http import GetAuthHeadersOptions, get_auth_headers
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sidecar.core.errors import ConfigError
from sidecar.core.identity import write_secret
from sidecar.server.config import Settings
from sidecar.server.credentials import (
    CdpApiKey,
    CredentialsUnusable,
    HeadersFile,
    NoCredentials,
    parse_headers,
)
from sidecar.server.facilitation import Supported
from sidecar.server.facilitators import FacilitatorSpec, endpoints

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OPERATOR = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
ONCHAIN = {"USDF": {"network": "eip155:31337", "token": TOKEN, "name": "USD Coin", "version": "2"}}
EXACT = {"onchain": ONCHAIN, "pay_to": OPERATOR}
VERIFY_URL = "https://api.cdp.coinbase.com/platform/v2/x402/verify"


def load(raw: dict[str, Any], **env: str) -> Settings:
    return Settings.from_mapping(raw, env)


# -- config ---------------------------------------------------------------------------------


def test_facilitator_url_is_a_list_of_one_without_credentials() -> None:
    settings = load({**EXACT, "facilitator_url": "https://f.example/x402"})
    assert settings.facilitator_specs() == (FacilitatorSpec("https://f.example/x402"),)
    (endpoint,) = endpoints(settings.facilitator_specs())
    assert isinstance(endpoint.credentials, NoCredentials)


def test_several_facilitators_in_order_publish_the_first(tmp_path: Path) -> None:
    headers = tmp_path / "headers"
    write_secret(headers, "Authorization: Bearer t0k3n-0123456789\n")
    listed = [
        {"url": "https://one.example/x402", "headers_file": str(headers)},
        {"url": "http://two.example:4022"},
    ]
    settings = load({**EXACT, "facilitators": listed})
    first, second = settings.facilitator_specs()
    assert (first.host, second.host) == ("one.example", "two.example:4022")
    terms = settings.exact_terms()
    assert terms is not None and terms.facilitator_url == "https://one.example/x402"
    one, _two = endpoints(settings.facilitator_specs())
    assert one.credentials.headers("POST", first.url) == {
        "Authorization": "Bearer t0k3n-0123456789"
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"facilitators": [{"url": "https://a"}], "facilitator_url": "https://b"}, "not both"),
        ({"facilitators": "https://a.example"}, "config facilitators: must be a list"),
        ({"facilitators": ["https://a.example"]}, r"facilitators\[0\]: a mapping"),
        ({"facilitators": [{"url": "ftp://a"}]}, r"facilitators\[0\]: an http\(s\) URL"),
        ({"facilitators": [{"url": "https://a", "token": "x"}]}, "unknown key 'token'"),
        (
            {"facilitators": [{"url": "https://a", "headers_file": "h", "cdp_api_key_file": "k"}]},
            "not both",
        ),
        ({"facilitators": []}, "facilitator_url or facilitators: required with onchain"),
        ({"facilitator_supported_seconds": 0}, "facilitator_supported_seconds: must be at least 1"),
    ],
)
def test_bad_facilitators_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load({**EXACT, "facilitator_url": "", **change})


# -- a headers file -------------------------------------------------------------------------


def test_a_missing_or_readable_credentials_file_is_an_error_naming_it(tmp_path: Path) -> None:
    spec = FacilitatorSpec("https://a.example", headers_file=str(tmp_path / "gone"), key="f")
    with pytest.raises(ConfigError, match=f"f.headers_file: cannot read {tmp_path}/gone"):
        spec.endpoint()
    shared = tmp_path / "shared"
    write_secret(shared, "Authorization: Bearer s3cr3t-value\n")
    for mode in (0o640, 0o604):  # group- or world-readable
        shared.chmod(mode)
        with pytest.raises(ConfigError, match=f"{shared} has mode 0{mode:o}") as refused:
            FacilitatorSpec("https://a.example", headers_file=str(shared)).endpoint()
        assert "s3cr3t" not in str(refused.value)


def test_the_headers_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "headers"
    write_secret(path, "# the facilitator's token\nAuthorization: Bearer first\n")
    headers = HeadersFile(str(path), "facilitators[0].headers_file")
    assert headers.headers("POST", "https://a/verify") == {"Authorization": "Bearer first"}
    path.write_text("Authorization: Bearer second-and-longer\nX-Api-Key: k\n")
    assert headers.headers("POST", "https://a/verify") == {
        "Authorization": "Bearer second-and-longer",
        "X-Api-Key": "k",
    }
    path.chmod(0o644)  # now readable by anyone: refused, never the old token kept
    with pytest.raises(CredentialsUnusable, match="has mode 0644"):
        headers.headers("POST", "https://a/verify")
    path.chmod(0o600)
    path.write_text("not a header line\n")
    with pytest.raises(CredentialsUnusable, match="line 1 is not `Name: value`") as bad:
        headers.headers("POST", "https://a/verify")
    assert "not a header" not in str(bad.value)  # the content is never quoted
    os.unlink(path)
    with pytest.raises(CredentialsUnusable, match="cannot read"):
        headers.headers("POST", "https://a/verify")
    write_secret(path, "Authorization: Bearer third\n")
    assert headers.headers("GET", "https://a/supported") == {"Authorization": "Bearer third"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no `Name: value` line"),
        ("Authorization Bearer x", "line 1 is not"),
        ("Bad Name: x", "line 1 is not"),
        ("X-Key:", "line 1 .X-Key. has no value"),
        ("# c\nHost: evil.example", "line 2: Host is set by the HTTP client"),
    ],
)
def test_header_lines_are_checked(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_headers(text.encode(), "h")


# -- a CDP API key --------------------------------------------------------------------------


def cdp_key_file(tmp_path: Path, secret: str, key_id: str, field: str = "id") -> str:
    path = tmp_path / f"cdp-{field}.json"
    write_secret(path, json.dumps({field: key_id, "privateKey": secret}))
    return str(path)


def decoded(token: str, public: Any, alg: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, public, algorithms=[alg], options={"verify_aud": False})
    return header, claims


def test_a_cdp_ed25519_key_mints_an_eddsa_jwt_per_request(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public_raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    secret = base64.b64encode(seed + public_raw).decode()  # the CDP portal's Ed25519 form
    key = CdpApiKey(cdp_key_file(tmp_path, secret, "key-1"), "facilitators[0].cdp_api_key_file")
    first = key.headers("POST", VERIFY_URL)
    second = key.headers("POST", VERIFY_URL)
    assert first["Authorization"] != second["Authorization"]  # a fresh JWT per request
    token = first["Authorization"].removeprefix("Bearer ")
    header, claims = decoded(token, private.public_key(), "EdDSA")
    assert (header["alg"], header["kid"], header["typ"]) == ("EdDSA", "key-1", "JWT")
    assert header["nonce"].isdigit() and len(header["nonce"]) == 16
    assert (claims["sub"], claims["iss"]) == ("key-1", "cdp")
    assert claims["uris"] == ["POST api.cdp.coinbase.com/platform/v2/x402/verify"]
    assert claims["exp"] - claims["nbf"] == 120
    # The same header and claims as cdp-sdk's own facilitator config sends CDP.
    options = GetAuthHeadersOptions(
        api_key_id="key-1",
        api_key_secret=secret,
        request_method="POST",
        request_host="api.cdp.coinbase.com",
        request_path="/platform/v2/x402/verify",
        source="x402",
    )
    theirs = get_auth_headers(options)
    their_header, their_claims = decoded(
        theirs["Authorization"].removeprefix("Bearer "), private.public_key(), "EdDSA"
    )
    assert set(their_header) == set(header) and their_header["kid"] == header["kid"]
    assert {k: v for k, v in their_claims.items() if k not in ("nbf", "exp")} == {
        k: v for k, v in claims.items() if k not in ("nbf", "exp")
    }
    assert first["Correlation-Context"] == theirs["Correlation-Context"]


def test_a_cdp_ec_key_mints_an_es256_jwt_naming_the_path(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    name = "organizations/org-1/apiKeys/key-2"  # an older key file names it `name`
    key = CdpApiKey(cdp_key_file(tmp_path, pem, name, "name"), "k")
    token = key.headers("GET", "https://facilitator.example:8443/x402/supported")["Authorization"]
    header, claims = decoded(token.removeprefix("Bearer "), private.public_key(), "ES256")
    assert (header["alg"], header["kid"], claims["sub"]) == ("ES256", name, name)
    assert claims["uris"] == ["GET facilitator.example:8443/x402/supported"]


def test_a_bad_cdp_key_file_is_an_error_naming_it_never_quoting_it(tmp_path: Path) -> None:
    path = cdp_key_file(tmp_path, "bm90LWEta2V5LXMzY3IzdA==", "key-3")
    with pytest.raises(ConfigError, match=f"k: {path}: privateKey is not") as refused:
        CdpApiKey(path, "k")
    assert "bm90LWEta2V5" not in str(refused.value)
    other = tmp_path / "other.json"
    write_secret(other, '{"privateKey": "x"}')
    with pytest.raises(ConfigError, match="needs `id` and `privateKey`"):
        CdpApiKey(str(other), "k")


def test_without_cdp_sdk_a_cdp_key_is_a_config_error_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cdp.auth.utils", None)  # the extra not installed
    with pytest.raises(ConfigError, match=r"pip install 'x402-sidecar\[cdp\]'"):
        CdpApiKey(str(tmp_path / "any.json"), "facilitators[0].cdp_api_key_file")


# -- GET /supported -------------------------------------------------------------------------


def test_the_supported_answer_is_read_as_the_official_shape() -> None:
    answer = {
        "kinds": [
            {"x402Version": 2, "scheme": "exact", "network": "eip155:31337"},
            {
                "x402Version": 2,
                "scheme": "exact",
                "network": "solana:*",
                "extra": {"feePayer": "F"},
            },
            {"x402Version": 1, "scheme": "exact", "network": "base-sepolia"},
        ],
        "extensions": ["bazaar"],
        "signers": {"eip155:*": ["0xabc"]},
    }
    supported = Supported.from_wire(answer)
    assert supported.kind("exact", "eip155:31337") is not None
    assert supported.kind("exact", "eip155:8453") is None
    kind = supported.kind("exact", "solana:devnet")  # a wildcard kind
    assert kind is not None and kind.extra == {"feePayer": "F"}
    assert supported.signers == {"eip155:*": ("0xabc",)}
    assert supported.extensions == ("bazaar",)
    bad_answers: list[dict[str, Any]] = [
        {},
        {"kinds": {}},
        {"kinds": [{"scheme": "exact"}]},
        {"kinds": [], "signers": []},
    ]
    for bad in bad_answers:
        with pytest.raises(ValueError):
            Supported.from_wire(bad)
