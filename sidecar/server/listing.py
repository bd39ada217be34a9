"""The x402 extensions each priced route's 402 declares (`PaymentRequired.extensions`),
built once per route and method at start with the official `x402` package's own helpers,
so their shape is the standard's exactly:

- `bazaar` (x402.extensions.bazaar): how to call the route, for facilitators' discovery
  catalogs — its input (query parameters, or a body) and output, from the route's
  optional `input_schema`, `input_example`, `output_schema`, `output_example` and
  `body_type` keys; declared where one of them is set, or `discoverable: true`.
- `payment-identifier` (x402.extensions.payment_identifier): declared on every priced
  route, `required: false` unless the route says `payment_identifier: required`.

The check looks the route's declaration up by (route name, method): one dict lookup per
402, nothing built per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

from sidecar.core.errors import ConfigError

ROUTE_KEYS = (
    "discoverable",
    "input_schema",
    "input_example",
    "output_schema",
    "output_example",
    "body_type",
    "payment_identifier",
)
DISCOVERY_KEYS = ROUTE_KEYS[1:6]
QUERY_METHODS = ("GET", "HEAD", "DELETE")
BODY_METHODS = ("POST", "PUT", "PATCH")
BODY_TYPES = ("json", "form-data", "text")
PAYMENT_IDENTIFIER = ("optional", "required")
ANY = "*"
# A route's declaration without a method (discovery's, and a `*` route's other methods).
NO_METHOD = ""

Declarations = dict[tuple[str, str], dict[str, Any]]


def declarations(routes: Iterable[tuple[str, str, Mapping[str, Any]]]) -> Declarations:
    """(route name, method) → the 402's `extensions` for each priced route's (name,
    method, spec): the route's method (HEAD too for GET; every bazaar method for `*`),
    and NO_METHOD, the declaration before the method is known; (NO_METHOD, NO_METHOD) is a
    route that only Envoy's annotations price: payment-identifier, optional."""
    table: Declarations = {(NO_METHOD, NO_METHOD): _payment_identifier("routes", "optional")}
    for name, method, spec in routes:
        key = f"config routes.{name}"
        base = _payment_identifier(key, spec.get("payment_identifier", "optional"))
        bazaar = _bazaar(key, method, spec)
        table[(name, NO_METHOD)] = {**bazaar, **base}
        if not bazaar:
            continue
        methods = (
            (*QUERY_METHODS, *BODY_METHODS)
            if method == ANY
            else (method, "HEAD")
            if method == "GET"
            else (method,)
        )
        for each in methods:
            enriched = _for_method(key, each, spec)
            table[(name, each)] = {**enriched, **base} if enriched else base
    return table


def _payment_identifier(key: str, value: Any) -> dict[str, Any]:
    from x402.extensions.payment_identifier import (
        PAYMENT_IDENTIFIER as NAME,
    )
    from x402.extensions.payment_identifier import (
        declare_payment_identifier_extension,
    )

    if value not in PAYMENT_IDENTIFIER:
        raise ConfigError(f"{key}.payment_identifier: one of {', '.join(PAYMENT_IDENTIFIER)}")
    return {NAME: declare_payment_identifier_extension(required=value == "required")}


def _bazaar(key: str, method: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The route's bazaar declaration before its method is known ({} if it has none)."""
    discoverable = spec.get("discoverable", None)
    if discoverable is not None and not isinstance(discoverable, bool):
        raise ConfigError(f"{key}.discoverable: true or false")
    given = [k for k in DISCOVERY_KEYS if k in spec]
    if discoverable is False:
        if given:
            raise ConfigError(f"{key}.{given[0]}: the route says discoverable: false")
        return {}
    if not given and not discoverable:
        return {}
    for name in ("input_schema", "input_example", "output_schema", "output_example"):
        if name in spec and not isinstance(spec[name], Mapping):
            raise ConfigError(f"{key}.{name}: a mapping (JSON Schema, or a JSON object)")
    if "output_schema" in spec and "output_example" not in spec:
        raise ConfigError(
            f"{key}.output_example: required with output_schema (the bazaar declares the "
            "output by an example, which the schema describes)"
        )
    body_type = spec.get("body_type")
    if body_type is not None and (body_type not in BODY_TYPES or method in QUERY_METHODS):
        raise ConfigError(
            f"{key}.body_type: one of {', '.join(BODY_TYPES)}, on a POST, PUT or PATCH route"
        )
    return _declare(spec, body_type if method in BODY_METHODS else None)


def _declare(spec: Mapping[str, Any], body_type: str | None) -> dict[str, Any]:
    from x402.extensions.bazaar import OutputConfig, declare_discovery_extension

    output = None
    if "output_example" in spec:
        schema = spec.get("output_schema")
        output = OutputConfig(
            example=dict(spec["output_example"]), schema=dict(schema) if schema else None
        )
    schema = spec.get("input_schema")
    declared: dict[str, Any] = declare_discovery_extension(
        input=dict(spec["input_example"]) if "input_example" in spec else None,
        input_schema=dict(schema) if schema is not None else None,
        body_type=body_type,  # type: ignore[arg-type]
        output=output,
    )
    return declared


def _for_method(key: str, method: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The bazaar declaration for requests of `method`, as the official resource-server
    extension enriches it (the method in its info and schema), checked against its own
    schema (an example the schema refuses would never be catalogued)."""
    from x402.extensions.bazaar import (
        BAZAAR,
        bazaar_resource_server_extension,
        validate_discovery_extension,
    )
    from x402.extensions.bazaar.types import parse_discovery_extension

    if method not in QUERY_METHODS + BODY_METHODS:
        return {}
    body_type = spec.get("body_type", "json") if method in BODY_METHODS else None
    declared = _declare(spec, body_type)[BAZAAR.key]
    context = SimpleNamespace(method=method, route_pattern=None)
    enriched: dict[str, Any] = bazaar_resource_server_extension.enrich_declaration(
        declared, context
    )
    result = validate_discovery_extension(parse_discovery_extension(enriched))
    if not result.valid:
        raise ConfigError(f"{key}: the bazaar declaration does not validate: {result.errors[0]}")
    return {BAZAAR.key: enriched}
