"""The Helm chart's copy of the contract with Envoy, generated from contract.py.

The chart renders Envoy's config in Go templates, which cannot import Python: its
`templates/_contract.tpl` defines `x402.contract`, a JSON object of every name, key and
fixed piece the chart's Envoy config shares with the renderer, written by

    python -m sidecar.server.envoy.chart > helm/x402-sidecar/templates/_contract.tpl

and read by `include "x402.contract" . | fromJson`. tests/helm/test_parity.py fails when
the file is stale.
"""

from __future__ import annotations

import json
from typing import Any

from sidecar.core import mcp, phases
from sidecar.server.envoy import browser, contract, headers, phase_call, replies
from sidecar.server.envoy.filters import (
    HEADERS_MODE,
    MCP_CHARGED_MODE,
    MCP_HELD_MODE,
    MCP_REQUEST_BODY,
)

HEADER = """\
{{/* GENERATED from sidecar/server/envoy/contract.py: do not edit. Regenerate with
     python -m sidecar.server.envoy.chart > helm/x402-sidecar/templates/_contract.tpl
     (tests/helm/test_parity.py fails when it is stale). The names, keys and fixed
     pieces Envoy's config shares with the sidecar, as JSON:
     include "x402.contract" . | fromJson */}}
"""


def contract_values() -> dict[str, Any]:
    """Everything the chart's _envoy.tpl would otherwise copy by hand."""
    return {
        "extAuthz": contract.EXT_AUTHZ,
        "extProc": contract.EXT_PROC,
        "discoveryPath": contract.DISCOVERY_PATH,
        "topupPath": contract.TOPUP_PATH,
        "channelPathPrefix": contract.CHANNEL_PATH_PREFIX,
        "assertedPrefixes": list(contract.ASSERTED_PREFIXES),
        "methodOverrideHeaders": list(contract.METHOD_OVERRIDE_HEADERS),
        "requestIdHeader": contract.REQUEST_ID_HEADER,
        "authzRequestHeaders": list(contract.AUTHZ_REQUEST_HEADERS),
        "httpRequestHeaders": list(contract.HTTP_REQUEST_HEADERS),
        "timeoutHeader": contract.TIMEOUT_HEADER,
        "phaseHeader": contract.PHASE_HEADER,
        "phaseResponse": contract.PHASE_RESPONSE,
        "upstreamHeaders": list(contract.UPSTREAM_HEADERS),
        "denialHeaders": list(contract.DENIAL_HEADERS),
        "successHeaders": list(contract.SUCCESS_HEADERS),
        "metadataKeys": list(contract.METADATA_KEYS),
        "accessLogKeys": list(contract.ACCESS_LOG_KEYS),
        "denialMetadataKey": contract.DENIAL_METADATA_KEY,
        "unavailableMark": contract.UNAVAILABLE_MARK,
        "extRoute": contract.EXT_ROUTE,
        "extPrice": contract.EXT_PRICE,
        "extAsset": contract.EXT_ASSET,
        "extDescription": contract.EXT_DESCRIPTION,
        "extCharge": phases.EXT_CHARGE,
        "chargeOnSuccess": phases.ON_SUCCESS,
        "extPhase": contract.EXT_PHASE,
        # A route key of the sidecar config → its response-phase annotation.
        "phaseExtensions": {key: f"x402.{key}" for key in phases.ROUTE_KEYS if key != "charge"},
        "corsAllowHeaders": browser.CORS_ALLOW_HEADERS,
        "corsExposeHeaders": browser.CORS_EXPOSE_HEADERS,
        "corsAllowMethods": browser.CORS_ALLOW_METHODS,
        "corsMaxAge": browser.CORS_MAX_AGE,
        "paymentPreflight": contract.PAYMENT_PREFLIGHT,
        "headersLimitName": headers.NAME,
        "headersLimitLua": headers.HEADERS_LIMIT_LUA,
        "headersLimitMark": headers.LIMIT_MARK,
        "maxCodecHeadersKb": headers.MAX_CODEC_KB,
        "headersProcessingMode": HEADERS_MODE,
        # Held routes' response phase (phase_call.py): its two Lua filters and the marks.
        "phaseCallName": phase_call.NAME,
        "phaseDropName": phase_call.DROP_NAME,
        "phaseCallSource": phase_call.SOURCE,
        "phaseCallLua": phase_call.PHASE_LUA,
        "phaseDropLua": phase_call.DROP_LUA,
        "phaseCallKeepMark": phase_call.KEEP_MARK,
        "phaseCallTimeoutMark": phase_call.TIMEOUT_MARK,
        # MCP routes (core/mcp.py): their annotations, request body and response phase.
        "mcpRouteKey": mcp.ROUTE_KEY,
        "extMcpTools": mcp.EXT_MCP_TOOLS,
        "extMcpDefault": mcp.EXT_MCP_DEFAULT,
        "mcpFree": mcp.FREE,
        "mcpRequestBody": MCP_REQUEST_BODY,
        "mcpBufferBytes": contract.MCP_BUFFER_BYTES,
        "mcpHeldProcessingMode": MCP_HELD_MODE,
        "mcpChargedProcessingMode": MCP_CHARGED_MODE,
        "localReplies": replies.mappers(),
    }


def contract_template() -> str:
    """The text of the chart's templates/_contract.tpl."""
    text = json.dumps(contract_values(), indent=2)
    if "{{" in text or "}}" in text:  # Go's template delimiters
        raise ValueError("the contract holds a template delimiter")
    return f'{HEADER}{{{{- define "x402.contract" -}}}}\n{text}\n{{{{- end }}}}\n'


def main() -> None:
    print(contract_template(), end="")


if __name__ == "__main__":
    main()
