"""The contract with Envoy: every name and key the sidecar and Envoy's config must agree on.

Both transports (server/authz/http_transport.py, the gRPC servicer), the response phase
(server/processing/), the config renderer (render.py) and the Helm chart (its
templates/_contract.tpl is generated from this module by chart.py) read them here. The few
that pure code in `sidecar/core` needs itself (the headers asserted to the service, the
proof and receipt headers, the route annotations) are defined there, where imports point,
and gathered here, so this file reads as the whole contract.
"""

from __future__ import annotations

from sidecar.core.decision import (
    UPSTREAM_AMOUNT,
    UPSTREAM_HEADERS,
    UPSTREAM_HOLD,
    UPSTREAM_PAYER,
    UPSTREAM_RECEIPT,
)
from sidecar.core.mcp import DEFAULT_MAX_BODY_BYTES
from sidecar.core.phases import EXT_PHASE, PHASE_KEYS, PHASE_RESPONSE
from sidecar.core.pricing import EXT_ASSET, EXT_DESCRIPTION, EXT_PRICE, EXT_ROUTE
from sidecar.core.protocol import (
    ASSERTED_PREFIXES,
    DISCOVERY_PATH,
    PAYMENT_RESPONSE,
    PROOF_HEADERS,
    RECEIPT_HEADERS,
)

__all__ = [
    "ASSERTED_PREFIXES",
    "DISCOVERY_PATH",
    "EXT_ASSET",
    "EXT_DESCRIPTION",
    "EXT_PHASE",
    "EXT_PRICE",
    "EXT_ROUTE",
    "PAYMENT_RESPONSE",
    "PHASE_KEYS",
    "PHASE_RESPONSE",
    "PROOF_HEADERS",
    "RECEIPT_HEADERS",
    "UPSTREAM_AMOUNT",
    "UPSTREAM_HEADERS",
    "UPSTREAM_HOLD",
    "UPSTREAM_PAYER",
    "UPSTREAM_RECEIPT",
]

# -- Envoy's filters and the sidecar's paths ----------------------------------------------
EXT_AUTHZ = "envoy.filters.http.ext_authz"  # also the namespace of its dynamic metadata
EXT_PROC = "envoy.filters.http.ext_proc"
TRANSPORTS = ("grpc", "http")  # how ext_authz asks: the Check service, or http_service
TOPUP_PATH = "/x402/topup"  # served by the side port; Envoy routes it without ext_authz
# Self-serve channels (server/self_channels.py): the side port too, one Envoy route (prefix).
CHANNEL_PATH_PREFIX = "/x402/channel/"
CHANNEL_OPEN_PATH, CHANNEL_CLOSE_PATH = CHANNEL_PATH_PREFIX + "open", CHANNEL_PATH_PREFIX + "close"

# -- Request headers ----------------------------------------------------------------------
REQUEST_ID_HEADER = "x-request-id"
# An unpaid browser's navigation gets the paywall (server/paywall.py); an MCP route's
# answer made by the gateway is JSON or an SSE event, as the client accepts.
ACCEPT_HEADER = "accept"
EXTERNAL_ADDRESS = "x-envoy-external-address"  # the client's address, as Envoy saw it
FORWARDED_FOR, FORWARDED_PROTO = "x-forwarded-for", "x-forwarded-proto"
# A trusted proxy's name for the host agents reached (resource.url, docs/configuration.md).
FORWARDED_HOST = "x-forwarded-host"
# ASSERTED_PREFIXES (core/protocol.py): the gateway's x-x402-* assertions to the service
# and Envoy's own x-envoy-* control headers; a client's copies are removed before any
# filter runs, and the sidecar sets its own at ext_authz allow.
# Headers some frameworks take as the request's real method, so a GET priced as free
# could run as a DELETE in the service: removed unless `edge.strip_method_override` is off.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
# What Envoy sends of each request to the sidecar over gRPC (allowed_headers): what the
# decision reads, and no cookies, credentials or bodies.
AUTHZ_REQUEST_HEADERS = (*PROOF_HEADERS, REQUEST_ID_HEADER, FORWARDED_HOST, ACCEPT_HEADER)
# The same over HTTP, where the client's address is Envoy's own x-envoy-external-address,
# else the X-Forwarded-For entry Envoy appended itself (use_remote_address).
HTTP_REQUEST_HEADERS = (
    *PROOF_HEADERS,
    REQUEST_ID_HEADER,
    ACCEPT_HEADER,
    EXTERNAL_ADDRESS,
    FORWARDED_FOR,
    FORWARDED_PROTO,
    FORWARDED_HOST,
)
# Gateway-asserted headers Envoy adds to every HTTP check (authorization_request.
# headers_to_add; a client's x-x402-* never gets this far: the edge strips them): Envoy's
# deadline for the check, and on routes whose response phase runs, the phase.
TIMEOUT_HEADER = "x-x402-authz-timeout-ms"
PHASE_HEADER = "x-x402-phase"  # its value: PHASE_RESPONSE
# The response phase over HTTP (envoy/phase_call.py, a Lua filter's call) comes to the same
# listener as the checks: a POST to PROCESS_PATH carrying PROCESS_HEADER (which a check
# never carries) and TIMEOUT_HEADER, Envoy's deadline for the phase. The check's metadata
# travels as META_PREFIX + key, the response's headers as RESPONSE_PREFIX + name, its
# status as STATUS_HEADER, and its body as the POST's when BODY_HEADER says "whole".
PROCESS_PATH = "/x402/phase"
PROCESS_HEADER = "x-x402-process"  # its value: PHASE_RESPONSE
META_PREFIX = "x-x402-meta-"
RESPONSE_PREFIX = "x-x402-response-"
STATUS_HEADER = "x-x402-status"
BODY_HEADER, WHOLE_BODY = "x-x402-body", "whole"
# The sidecar's answer, always a 200: SET_PREFIX + name sets a header of the response,
# REMOVE_HEADER_LIST lists those removed, REPLACE_BODY_HEADER puts the answer's body in
# place of the response's, REPLACE_HEADER (a status) replaces the whole response (its
# headers but CORS's, and its body by the answer's).
SET_PREFIX = "x-x402-set-"
REMOVE_HEADER_LIST = "x-x402-remove"
REPLACE_HEADER = "x-x402-replace"
REPLACE_BODY_HEADER = "x-x402-replace-body"
# Envoy's own failure of the response phase (docs/protocol.md §5), as an MCP route's local
# reply (replies.py) and a held route's Lua call (phase_call.py) both write it.
PHASE_UNAVAILABLE = "response_phase_unavailable"
PHASE_UNAVAILABLE_MESSAGE = "the payment could not be completed; nothing was charged, retry shortly"

# -- Answer headers (HTTP transport) ------------------------------------------------------
# Envoy's instruction, on an allow, to strip these from the request before the service.
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# What Envoy passes to the client: from a denial, and with an allow.
# (payment-response: a failed `exact` settlement's SettleResponse, success false.)
# A retry answered with its payment's recorded response (server/replays.py): the service's
# headers it carries (both transports; the rest of the service's headers are not kept).
REPLAY_HEADERS = (
    "content-type",
    "cache-control",
    "content-encoding",
    "content-language",
    "content-disposition",
    "etag",
    "last-modified",
    "expires",
    "link",
    "location",
)
DENIAL_HEADERS = tuple(
    dict.fromkeys(
        (*REPLAY_HEADERS, "payment-required", PAYMENT_RESPONSE, *RECEIPT_HEADERS, "retry-after")
    )
)
SUCCESS_HEADERS = RECEIPT_HEADERS

# -- ext_authz dynamic metadata -----------------------------------------------------------
# What Envoy's access log reads of a paid request, and the asset it was paid in.
PAYER, AMOUNT, ASSET, RECEIPT_ID = "payer", "amount", "asset", "receipt_id"
ACCESS_LOG_KEYS = (PAYER, AMOUNT, RECEIPT_ID)
# A hold, carried to the response phase (ext_proc forwards the ext_authz namespace).
HOLD, HOLD_SCHEME, HELD, ROUTE, REQUEST_ID = "hold", "hold_scheme", "held", "route", "request_id"
# `exact`'s hold: the authorization (the agent's envelope, our offer) and its reservation,
# for the /settle after success. Envoy keeps dynamic metadata per request and logs only the
# keys its access-log format names; the decision lines never carry these.
ENVELOPE, REQUIREMENTS, RESERVATION, RESOURCE = (
    "exact_envelope",
    "exact_requirements",
    "exact_reservation",
    "exact_resource",
)
# The request's host and scheme: a refusal at the response (402 settlement_failed) carries
# a fresh challenge whose resource URL is the request's.
HOST, HTTP_SCHEME = "http_host", "http_scheme"
# The payment's identity and the fingerprint of its request (core/retries.py), "<identity>
# <fingerprint>": an `exact` settle at the response records its outcome under it.
OUTCOME = "payment_outcome"
# A hold's facts travel packed, as one JSON object in HOLD_FACTS beside HOLD (its id) and
# the access log's keys (server/schemes/base.py): Envoy turns each key into a header match
# at the check (over HTTP), a Struct field, and JSON for the response phase (its http
# service), so one key instead of fifteen is less of Envoy's time on every held request.
# The response phase's transports unpack it (base.unpacked) into its keys: HOLD_SCHEME,
# ASSET, HELD, ROUTE, REQUEST_ID, `exact`'s and `upto`'s above, and the phase's annotations
# (PHASE_KEYS).
HOLD_FACTS = "hold_facts"
HOLD_METADATA_KEYS: tuple[str, ...] = (HOLD, HOLD_FACTS, PAYER, AMOUNT, RECEIPT_ID)
# Dynamic metadata {"x402": "denied"} on every denial: Envoy's local-reply mappers
# (replies.local_reply_config) leave a reply carrying it as the sidecar wrote it.
DENIAL_METADATA_KEY = "x402"
DENIAL_METADATA = {DENIAL_METADATA_KEY: "denied"}
# Over HTTP Envoy takes any 5xx for the sidecar's own failure and drops its answer: a 503
# denial travels as this stand-in status, marked with this value of DENIAL_METADATA_KEY,
# and a local-reply mapper gives it back its 503.
UNAVAILABLE_STAND_IN, UNAVAILABLE_MARK = 490, "unavailable"
# MCP routes (core/mcp.py, server/authz/mcp_calls.py): what the check tells the response
# phase of a JSON-RPC request: a paid tools/call (its settlement, the x402 SettleResponse as
# JSON, when charged on check) or a tools/list (the tools' prices, as JSON).
MCP, MCP_SETTLE, MCP_PRICES = "mcp", "mcp_settle", "mcp_prices"
MCP_CALL, MCP_LIST = "call", "list"  # values of MCP
MCP_METADATA_KEYS = (MCP, MCP_SETTLE, MCP_PRICES)
# The gateway's own 200 answers, an MCP route's payment-required one (a JSON-RPC result)
# and a replayed response (server/replays.py): over HTTP a 200 from the sidecar would
# allow, so it travels as this stand-in status, marked with this value of
# DENIAL_METADATA_KEY, and a local-reply mapper gives it back its 200.
ANSWERED_STAND_IN, ANSWERED_MARK = 491, "answered"
# What Envoy sends of an MCP route's request body to the check (with_request_body).
MCP_BODY_BYTES = DEFAULT_MAX_BODY_BYTES
# An MCP route's stream buffer (its route's request_body_buffer_limit, which Envoy 1.36+
# lets exceed the edge's 32 KiB): the request's body and the tool's answer, which the
# response phase reads whole, are buffered up to it; a longer answer is Envoy's 500.
MCP_BUFFER_BYTES = 1048576
# Every key the decision may put in ext_authz's dynamic metadata; over HTTP each travels as
# a header of that name and Envoy's dynamic_metadata_from_headers turns it back.
METADATA_KEYS = tuple(
    dict.fromkeys(
        (
            PAYER,
            AMOUNT,
            ASSET,
            RECEIPT_ID,
            *HOLD_METADATA_KEYS,
            DENIAL_METADATA_KEY,
            *MCP_METADATA_KEYS,
        )
    )
)

# -- Per-route context_extensions (gRPC) --------------------------------------------------
# A priced route's own, then its response phase's (PHASE_KEYS, from core/phases.py).
ROUTE_EXTENSIONS = (EXT_ROUTE, EXT_PRICE, EXT_ASSET, EXT_DESCRIPTION)

# -- What browsers may send and read (the gateway's own answers) --------------------------
# (The official TypeScript clients send `Access-Control-Expose-Headers` on their paid
# retry, so a browser's preflight asks for it too.)
CORS_ALLOW_HEADERS = (
    "payment-signature",
    "x-payment",
    "content-type",
    "authorization",
    "access-control-expose-headers",
)
CORS_EXPOSE_HEADERS = (
    "payment-required",
    "payment-response",
    "x-payment-response",
    REQUEST_ID_HEADER,
    "retry-after",
)
# A browser's preflight for a request that carries a payment header (the fetch spec lists
# the header names in lower case, comma separated).
PAYMENT_PREFLIGHT = "(?i)(.*[ ,])?(payment-signature|x-payment)([ ,].*)?"
