"""The fth-x402/2.0 wire format: invoices, proofs and receipts (PROTOCOL.md §2-4). Pure."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import retries
from sidecar.core.errors import (
    InvalidChallenge,
    MalformedPayment,
    UnsupportedScheme,
    UnsupportedVersion,
)
from sidecar.core.identity import Identity, b64url, verify, verify_key

VERSION = "fth-x402/2.0"
SCHEME = "prepaid-ed25519"
EXACT_SCHEME = "exact"  # the x402 standard scheme (core/exact.py), routed by accepted.scheme
# The x402 standard schemes whose envelope itself is the payment (core/exact.py, core/upto.py).
ENVELOPE_SCHEMES = frozenset({EXACT_SCHEME, "upto"})
X402_VERSION = 2
PROOF_DOMAIN = b"fth-x402/2.0 proof\n"
RECEIPT_DOMAIN = b"fth-x402/2.0 receipt\n"
PROOF_HEADERS = ("x-payment", "payment-signature")
RECEIPT_HEADERS = ("x-payment-response", "payment-response")
# The standard's header: the signed receipt on prepaid and channel payments; an `exact`
# payment's SettleResponse (core/exact.py settle_response), its receipt then in X_RECEIPT.
X_RECEIPT, PAYMENT_RESPONSE = RECEIPT_HEADERS
# Headers only the gateway writes: its assertions to the service (x-x402-*) and Envoy's own
# control headers (x-envoy-*). A client's copies are removed at the edge (server/envoy/).
ASSERTED_PREFIXES = ("x-x402-", "x-envoy-")
MIN_NONCE_CHARS = 22  # 128 bits of base64url
MAX_FIELD_CHARS = 512

# Fields of a proof and their JSON types; `invoice_id` is absent in direct payments.
PROOF_FIELDS: dict[str, type] = {
    "version": str, "scheme": str, "invoice_id": str, "nonce": str, "resource": str,
    "asset": str, "amount": str, "payee": str, "expires_at": int, "payer": str,
    "signature": str,
}  # fmt: skip
# What the invoice MAC covers: every field the agent echoes back in its proof.
# An invoice carries what a proof echoes back, without the payer's name and signature.
INVOICE_FIELDS = {
    name: kind for name, kind in PROOF_FIELDS.items() if name not in ("payer", "signature")
}
INVOICE_MAC_FIELDS = (
    "version", "scheme", "nonce", "resource", "asset", "amount", "payee", "expires_at"
)  # fmt: skip


def json_encoder(**options: Any) -> Callable[[Any], str]:
    """`JSONEncoder(**options).encode`, built once for the hot path: json.dumps with options
    builds a new encoder on every call, and even a kept JSONEncoder builds its C encoder on
    every `encode` (a few µs). This keeps the C encoder itself. The output is the same bytes;
    only a self-referencing object fails differently (RecursionError, not ValueError)."""
    encoder = json.JSONEncoder(**options)
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # CPython's C accelerator
    if c_make_encoder is None or encoder.indent is not None:  # no C accelerator: as is
        return encoder.encode
    iterencode = c_make_encoder(
        None,  # markers: no circular-reference bookkeeping
        encoder.default,
        json.encoder.encode_basestring_ascii
        if encoder.ensure_ascii
        else json.encoder.encode_basestring,
        None,
        encoder.key_separator,
        encoder.item_separator,
        encoder.sort_keys,
        encoder.skipkeys,
        encoder.allow_nan,
    )

    def encode(obj: Any) -> str:
        return "".join(iterencode(obj, 0))

    return encode


_CANONICAL = json_encoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Keys sorted, no whitespace, UTF-8: the bytes that are signed and MACed."""
    return _CANONICAL(obj).encode()


def encode_header(obj: Mapping[str, Any]) -> str:
    """Header values are standard base64 of compact JSON, as in the public x402 headers."""
    return base64.b64encode(canonical_json(obj)).decode("ascii")


def receipt_headers(
    encoded: str, settlement: Mapping[str, Any] | None = None
) -> tuple[tuple[str, str], ...]:
    """The answer headers of a payment: its signed receipt (`encoded`) in both, or, beside
    an `exact` SettleResponse, in X-Payment-Response alone."""
    if settlement is None:
        return tuple((name, encoded) for name in RECEIPT_HEADERS)
    return ((X_RECEIPT, encoded), (PAYMENT_RESPONSE, encode_header(settlement)))


def decode_header(value: str) -> Any:
    """Inverse of `encode_header`, lenient on alphabet and padding, strict on everything else."""
    text = value.strip().replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedPayment("payment header is not base64") from None
    return loads_strict(raw)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise MalformedPayment("payment JSON has a duplicate key")
    return obj


# A payment is a few flat objects. Counting brackets (in C) bounds the nesting before the
# recursive JSON parser sees it: a library in the same process (py_ecc, under web3) raises
# Python's recursion limit to 100,000, and 100,000 `[` would then overflow the C stack.
MAX_BRACKETS = 64


# Built once: json.loads with a hook builds a decoder and its scanner on every call.
_STRICT = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)


def loads_strict(raw: bytes) -> Any:
    if raw.count(b"[") + raw.count(b"{") > MAX_BRACKETS:
        raise MalformedPayment("payment JSON is nested too deeply")
    try:
        return _STRICT.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedPayment("payment header is not UTF-8") from None
    except (ValueError, RecursionError):  # JSONDecodeError, huge integers, deep nesting
        raise MalformedPayment("payment header is not valid JSON") from None


DISCOVERY_PATH = "/.well-known/x402"  # the price list and keys (PROTOCOL.md §6)


def direct_terms(
    resource: str, asset: str, amount: str, payee: str, expires_at: int
) -> dict[str, Any]:
    """The terms of a direct payment (no challenge, PROTOCOL.md §3) as their wire object: a
    fresh nonce, no invoice id; sign them with `sign_proof`."""
    return Invoice.direct(resource, asset, amount, payee, expires_at).to_wire()


def new_nonce() -> str:
    return "n_" + secrets.token_urlsafe(16)


def new_receipt_id() -> str:
    return "rcpt_" + secrets.token_urlsafe(16)


def invoice_id(secret: bytes, fields: Mapping[str, Any]) -> str:
    """Stateless invoices: the id is a 128-bit HMAC-SHA256 over the fields the proof echoes."""
    message = canonical_json({k: fields[k] for k in INVOICE_MAC_FIELDS})
    return "inv_" + b64url(hmac.new(secret, message, hashlib.sha256).digest()[:16])


def invoice_matches(secret: bytes, fields: Mapping[str, Any], claimed: str) -> bool:
    # Constant time; as bytes, because compare_digest refuses non-ASCII str (a hostile id).
    return hmac.compare_digest(invoice_id(secret, fields).encode(), claimed.encode())


def _terms(
    nonce: str, resource: str, asset: str, amount: str, payee: str, expires_at: int
) -> dict[str, Any]:
    """The fields the invoice MAC covers, as on the wire (INVOICE_MAC_FIELDS)."""
    return {
        "version": VERSION,
        "scheme": SCHEME,
        "asset": asset,
        "amount": amount,
        "nonce": nonce,
        "resource": resource,
        "payee": payee,
        "expires_at": expires_at,
    }


@dataclass(frozen=True, slots=True)
class Invoice:
    """The terms a proof signs (PROTOCOL.md §2): a 402's invoice, with the id that MACs it,
    or a direct payment's terms (`invoice_id` None). Version and scheme are this protocol's."""

    nonce: str
    resource: str
    asset: str
    amount: str
    payee: str
    expires_at: int
    invoice_id: str | None = None

    @classmethod
    def direct(cls, resource: str, asset: str, amount: str, payee: str, expires_at: int) -> Invoice:
        """A direct payment's terms: a fresh nonce, no invoice id."""
        return cls(new_nonce(), resource, asset, amount, payee, expires_at)

    @classmethod
    def issue(
        cls, secret: bytes, resource: str, asset: str, amount: str, payee: str, expires_at: int
    ) -> Invoice:
        """A fresh, stateless invoice: a new nonce, and the MAC of its terms as its id."""
        fresh = cls.direct(resource, asset, amount, payee, expires_at)
        return cls(*_fields_of(fresh), invoice_id=invoice_id(secret, fresh.terms))

    @property
    def terms(self) -> dict[str, Any]:
        """The fields the invoice MAC covers."""
        return _terms(*_fields_of(self))

    def to_wire(self) -> dict[str, Any]:
        """The invoice fields a proof echoes back (`invoice_id` only when there is one)."""
        wire = self.terms
        if self.invoice_id is not None:
            wire["invoice_id"] = self.invoice_id
        return wire

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any], what: str = "the invoice") -> Invoice:
        """A 402's invoice (its extra fields ignored), each field of its type and of our
        version and scheme; InvalidChallenge names `what` (where it came from) otherwise."""
        for name, kind in INVOICE_FIELDS.items():
            if type(obj.get(name)) is not kind:
                raise InvalidChallenge(f"{what} has no valid {name!r}")
        if obj["version"] != VERSION or obj["scheme"] != SCHEME:
            raise InvalidChallenge(
                f"cannot pay a {obj['version']}/{obj['scheme']} invoice "
                f"(this client speaks {VERSION}/{SCHEME})"
            )
        return cls(
            obj["nonce"],
            obj["resource"],
            obj["asset"],
            obj["amount"],
            obj["payee"],
            obj["expires_at"],
            obj["invoice_id"],
        )


# The x402 v2 PaymentRequirements fields and their JSON types, in wire order.
OFFER_FIELDS: dict[str, type] = {
    "scheme": str,
    "network": str,
    "amount": str,
    "asset": str,
    "payTo": str,
    "maxTimeoutSeconds": int,
    "extra": dict,
}


@dataclass(frozen=True, slots=True)
class Offer:
    """One entry of a 402's `accepts` (PROTOCOL.md §2, §11): the x402 v2
    PaymentRequirements of a scheme we take, as we publish it."""

    scheme: str
    network: str
    amount: str  # atomic units
    asset: str
    pay_to: str
    max_timeout_seconds: int
    extra: Mapping[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "network": self.network,
            "amount": self.amount,
            "asset": self.asset,
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_wire(cls, obj: Any) -> Offer:
        """An offer as published (exactly its fields, each of its JSON type), or
        MalformedPayment."""
        if not isinstance(obj, dict):
            raise MalformedPayment("an offer must be a JSON object")
        for name, kind in OFFER_FIELDS.items():
            if type(obj.get(name)) is not kind:
                raise MalformedPayment(f"the offer has no valid {name!r}")
        if obj.keys() != OFFER_FIELDS.keys():
            raise MalformedPayment("the offer has unknown fields")
        return cls(
            obj["scheme"],
            obj["network"],
            obj["amount"],
            obj["asset"],
            obj["payTo"],
            obj["maxTimeoutSeconds"],
            obj["extra"],
        )


def _fields_of(terms: Invoice | Proof) -> tuple[str, str, str, str, str, int]:
    return (terms.nonce, terms.resource, terms.asset, terms.amount, terms.payee, terms.expires_at)


@dataclass(frozen=True, slots=True)
class Proof:
    """A signed proof (PROTOCOL.md §3), parsed once per paid request."""

    nonce: str
    resource: str
    asset: str
    amount: str
    payee: str
    expires_at: int
    payer: str
    signature: str
    invoice_id: str | None  # None for a direct payment
    signed_message: bytes

    @property
    def is_direct(self) -> bool:
        """A one-round-trip payment from the price list: no invoice was issued."""
        return self.invoice_id is None

    @property
    def terms(self) -> dict[str, Any]:
        """The fields the invoice MAC covers."""
        return _terms(*_fields_of(self))

    @property
    def invoice(self) -> Invoice:
        """The terms this proof signs."""
        return Invoice(*_fields_of(self), invoice_id=self.invoice_id)

    def to_wire(self) -> dict[str, Any]:
        """The proof object of the X-Payment header, as it was signed."""
        wire = _terms(*_fields_of(self))
        if self.invoice_id is not None:
            wire["invoice_id"] = self.invoice_id
        wire["payer"], wire["signature"] = self.payer, self.signature
        return wire

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Proof:
        """A decoded payment object (decode_payment) → Proof, or a typed 400."""
        if obj.get("scheme") != SCHEME:
            raise UnsupportedScheme(f"scheme must be {SCHEME!r}")
        check_fields(obj, PROOF_FIELDS, optional="invoice_id")
        if not obj["nonce"].isascii() or len(obj["nonce"]) < MIN_NONCE_CHARS:
            raise MalformedPayment(f"nonce must be at least {MIN_NONCE_CHARS} ASCII characters")
        unsigned = {k: v for k, v in obj.items() if k != "signature"}
        return cls(
            nonce=obj["nonce"],
            resource=obj["resource"],
            asset=obj["asset"],
            amount=obj["amount"],
            payee=obj["payee"],
            expires_at=obj["expires_at"],
            payer=obj["payer"],
            signature=obj["signature"],
            invoice_id=obj.get("invoice_id"),
            signed_message=PROOF_DOMAIN + canonical_json(unsigned),
        )

    @classmethod
    def sign(cls, terms: Invoice, wallet: Identity) -> Proof:
        """Client side: `terms` signed by `wallet`."""
        unsigned = {**terms.to_wire(), "payer": wallet.public_key}
        message = PROOF_DOMAIN + canonical_json(unsigned)
        return cls(
            *_fields_of(terms),
            payer=wallet.public_key,
            signature=wallet.sign(message),
            invoice_id=terms.invoice_id,
            signed_message=message,
        )


def parse_proof(value: str, max_bytes: int) -> Proof:
    """Header value → Proof with every field of the right type, or a typed 400."""
    return Proof.from_wire(decode_payment(value, max_bytes))


def decode_payment(value: str, max_bytes: int) -> dict[str, Any]:
    """What every scheme's header shares: size, base64, JSON object, version."""
    return decode_paid(value, max_bytes)[0]


def decode_paid(value: str, max_bytes: int) -> tuple[dict[str, Any], str | None]:
    """`decode_payment`, and the x402 v2 envelope's payment-identifier id (None without
    one; core/retries.py). Decoded once; the servicer then picks the parser by `scheme`
    (Proof.from_wire, vouchers.voucher_from)."""
    if len(value) > max_bytes:
        raise MalformedPayment(f"payment header is larger than {max_bytes} bytes")
    obj = decode_header(value)
    payment_id = None
    if isinstance(obj, dict) and "x402Version" in obj:  # the x402 v2 PAYMENT-SIGNATURE envelope
        payment_id = retries.identifier(obj)
        accepted = obj.get("accepted")
        if isinstance(accepted, dict) and accepted.get("scheme") in ENVELOPE_SCHEMES:
            return obj, payment_id  # x402 `exact`, `upto`: the envelope itself is the payment
        obj = obj.get("payload")
    if not isinstance(obj, dict):
        raise MalformedPayment("payment must be a JSON object")
    if obj.get("version") != VERSION:
        raise UnsupportedVersion(f"version must be {VERSION!r}")
    return obj, payment_id


def check_fields(obj: Mapping[str, Any], spec: Mapping[str, type], optional: str = "") -> None:
    """Every field of `spec` present (but `optional`) with exactly its JSON type, strings
    non-empty and bounded, and no other field; else malformed_payment."""
    for name, kind in spec.items():
        if name not in obj:
            if name == optional:
                continue
            raise MalformedPayment(f"payment is missing {name!r}")
        field_value = obj[name]
        if type(field_value) is not kind:  # `type is`, so True is not an int
            raise MalformedPayment(f"payment field {name!r} must be a {kind.__name__}")
        if isinstance(field_value, str) and not 0 < len(field_value) <= MAX_FIELD_CHARS:
            raise MalformedPayment(f"payment field {name!r} is empty or too long")
    unknown = obj.keys() - spec.keys()
    if unknown:
        raise MalformedPayment(f"payment has unknown field {sorted(unknown)[0]!r}")


def sign_proof(terms: Invoice | Mapping[str, Any], wallet: Identity) -> dict[str, Any]:
    """Client side: sign invoice `terms` (or direct terms without invoice_id), as the wire
    object; a mapping's proof fields are signed as they are (tests send odd ones)."""
    if isinstance(terms, Invoice):
        return Proof.sign(terms, wallet).to_wire()
    fields = {k: terms[k] for k in PROOF_FIELDS if k in terms and k not in ("payer", "signature")}
    fields["payer"] = wallet.public_key
    fields["signature"] = wallet.sign(PROOF_DOMAIN + canonical_json(fields))
    return fields


def sign_receipt(fields: Mapping[str, Any], gateway: Identity) -> dict[str, Any]:
    body = {**fields, "kid": gateway.kid}
    return {**body, "signature": gateway.sign(RECEIPT_DOMAIN + canonical_json(body))}


# Stands in for the signature while the receipt is encoded: no receipt field holds it (and
# `signed_receipt` checks that it occurs once).
_MARK = "\x00signature\x00"
_SLOT = '"signature":' + _CANONICAL(_MARK)


def signed_receipt(fields: Mapping[str, Any], gateway: Identity) -> tuple[dict[str, Any], str]:
    """`sign_receipt` and the receipt's header value (`encode_header` of it), encoded once:
    the receipt with a mark for its signature, in key order. Without that field it is the
    signed message; with the signature in the mark's place, the header."""
    body = {**fields, "kid": gateway.kid}
    template = _CANONICAL({**body, "signature": _MARK})
    if "signature" in body or template.count(_SLOT) != 1:  # never on the hot path
        receipt = sign_receipt(fields, gateway)
        return receipt, encode_header(receipt)
    start = template.index(_SLOT)
    end = start + len(_SLOT)
    if template[start - 1] == ",":  # the field and the comma that joins it go
        message = template[: start - 1] + template[end:]
    else:  # the first key (no receipt's is, but fields may be anything)
        message = template[:start] + template[end + 1 :] if template[end] == "," else "{}"
    signature = gateway.sign(RECEIPT_DOMAIN + message.encode())
    header = f'{template[:start]}"signature":"{signature}"{template[end:]}'  # base64url
    return {**body, "signature": signature}, base64.b64encode(header.encode()).decode("ascii")


def verify_receipt(receipt: Mapping[str, Any], public_keys: Mapping[str, str]) -> bool:
    """Offline check with the gateway keys of discovery ({kid: base64url public key})."""
    signature, kid = receipt.get("signature"), receipt.get("kid")
    if not isinstance(signature, str) or not isinstance(kid, str) or kid not in public_keys:
        return False
    body = {k: v for k, v in receipt.items() if k != "signature"}
    try:
        key = verify_key(public_keys[kid])
    except ValueError:
        return False
    return verify(key, RECEIPT_DOMAIN + canonical_json(body), signature)
