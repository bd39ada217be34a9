{{/* GENERATED from sidecar/server/envoy/contract.py: do not edit. Regenerate with
     python -m sidecar.server.envoy.chart > helm/x402-sidecar/templates/_contract.tpl
     (tests/helm/test_parity.py fails when it is stale). The names, keys and fixed
     pieces Envoy's config shares with the sidecar, as JSON:
     include "x402.contract" . | fromJson */}}
{{- define "x402.contract" -}}
{
  "extAuthz": "envoy.filters.http.ext_authz",
  "extProc": "envoy.filters.http.ext_proc",
  "discoveryPath": "/.well-known/x402",
  "topupPath": "/x402/topup",
  "channelPathPrefix": "/x402/channel/",
  "assertedPrefixes": [
    "x-x402-",
    "x-envoy-"
  ],
  "methodOverrideHeaders": [
    "x-http-method-override",
    "x-http-method",
    "x-method-override"
  ],
  "requestIdHeader": "x-request-id",
  "authzRequestHeaders": [
    "x-payment",
    "payment-signature",
    "x-request-id",
    "x-forwarded-host",
    "accept"
  ],
  "httpRequestHeaders": [
    "x-payment",
    "payment-signature",
    "x-request-id",
    "accept",
    "x-envoy-external-address",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host"
  ],
  "timeoutHeader": "x-x402-authz-timeout-ms",
  "phaseHeader": "x-x402-phase",
  "phaseResponse": "response",
  "upstreamHeaders": [
    "x-x402-payer",
    "x-x402-amount",
    "x-x402-receipt-id",
    "x-x402-hold"
  ],
  "denialHeaders": [
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
    "payment-required",
    "payment-response",
    "x-payment-response",
    "retry-after"
  ],
  "successHeaders": [
    "x-payment-response",
    "payment-response"
  ],
  "metadataKeys": [
    "payer",
    "amount",
    "asset",
    "receipt_id",
    "hold",
    "hold_facts",
    "x402",
    "mcp",
    "mcp_settle",
    "mcp_prices"
  ],
  "accessLogKeys": [
    "payer",
    "amount",
    "receipt_id"
  ],
  "denialMetadataKey": "x402",
  "unavailableMark": "unavailable",
  "extRoute": "x402.route",
  "extPrice": "x402.price",
  "extAsset": "x402.asset",
  "extDescription": "x402.description",
  "extCharge": "x402.charge",
  "chargeOnSuccess": "on_success",
  "extPhase": "x402.phase",
  "phaseExtensions": {
    "failure_status": "x402.failure_status",
    "usage_header": "x402.usage_header",
    "usage_missing": "x402.usage_missing",
    "unit": "x402.unit",
    "unit_price": "x402.unit_price",
    "max_units": "x402.max_units",
    "min_units": "x402.min_units",
    "hold_seconds": "x402.hold_seconds"
  },
  "corsAllowHeaders": "payment-signature, x-payment, content-type, authorization, access-control-expose-headers",
  "corsExposeHeaders": "payment-required, payment-response, x-payment-response, x-request-id, retry-after",
  "corsAllowMethods": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
  "corsMaxAge": "600",
  "paymentPreflight": "(?i)(.*[ ,])?(payment-signature|x-payment)([ ,].*)?",
  "headersLimitName": "x402.headers_limit",
  "headersLimitLua": "local limit = @LIMIT_BYTES@\nlocal names = {[\"x402_dashboard\"] = true, [\"__Host-x402_dashboard\"] = true}\nlocal function strip_dashboard_cookie(headers)\n  local kept, dropped = {}, false\n  for i = 0, headers:getNumValues(\"cookie\") - 1 do\n    for pair in string.gmatch(headers:getAtIndex(\"cookie\", i), \"[^;]+\") do\n      local crumb = string.match(pair, \"^%s*(.-)%s*$\")\n      local name = string.match(crumb, \"^([^=]-)%s*=\") or crumb\n      if names[name] then dropped = true elseif crumb ~= \"\" then kept[#kept + 1] = crumb end\n    end\n  end\n  if not dropped then return end\n  headers:remove(\"cookie\")\n  if #kept > 0 then headers:add(\"cookie\", table.concat(kept, \"; \")) end\nend\nfunction envoy_on_request(request)\n  local headers = request:headers()\n  local size, cookies = 0, false\n  for name, value in pairs(headers) do\n    size = size + #name + #value\n    if name == \"cookie\" then cookies = true end\n  end\n  if size > limit then\n    request:respond({[\":status\"] = \"431\"}, \"\")\n    return\n  end\n  if cookies then strip_dashboard_cookie(headers) end\nend\n",
  "headersLimitMark": "@LIMIT_BYTES@",
  "maxCodecHeadersKb": 8192,
  "headersProcessingMode": {
    "request_header_mode": "SKIP",
    "response_header_mode": "SEND",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP"
  },
  "phaseCallName": "x402.response_phase",
  "phaseDropName": "x402.response_drop",
  "phaseCallSource": "phase",
  "phaseCallLua": "local limit = 32768\nlocal keep = @KEEP@\nlocal timeout = @TIMEOUT_MS@\nlocal unavailable = '{\"error\":\"response_phase_unavailable\",\"message\":\"the payment could not be completed; nothing was charged, retry shortly\",\"details\":\"x402_phase_'\n\n-- Replace the response: its headers but CORS's, its status, its body.\nlocal function replace(response, read, status, body, set)\n  local headers = response:headers()\n  local names = {}\n  for name, _ in pairs(headers) do\n    if name:sub(1, 1) ~= \":\" and name:sub(1, 15) ~= \"access-control-\" then\n      names[#names + 1] = name\n    end\n  end\n  for _, name in ipairs(names) do headers:remove(name) end\n  headers:replace(\":status\", status)\n  for name, value in pairs(set) do headers:replace(name, value) end\n  if read then\n    headers:replace(\"content-length\", tostring(#body))\n    response:body(true):setBytes(body)\n  else\n    headers:replace(\"x-x402-drop\", body)\n  end\nend\n\n-- Envoy's own failure of the phase: the typed 503, never the service's answer.\nlocal function fail(response, read, details)\n  replace(response, read, \"503\", unavailable .. details .. '\"}',\n    {[\"content-type\"] = \"application/json\", [\"cache-control\"] = \"no-store\",\n      [\"retry-after\"] = \"1\"})\nend\n\nlocal function phase(response, state)\n  local headers = response:headers()\n  headers:remove(\"x-x402-drop\")  -- only this filter asks for a drop\n  local meta = response:streamInfo():dynamicMetadata():get(\"envoy.filters.http.ext_authz\")\n  if meta == nil then return end\n  local call = {\n    [\":method\"] = \"POST\", [\":path\"] = \"/x402/phase\", [\":authority\"] = \"x402\",\n    [\"x-x402-process\"] = \"response\",\n    [\"x-x402-authz-timeout-ms\"] = tostring(timeout),\n  }\n  for key, value in pairs(meta) do\n    if type(value) == \"string\" then call[\"x-x402-meta-\" .. key] = value end\n  end\n  for name, value in pairs(headers) do\n    if name == \":status\" then\n      call[\"x-x402-status\"] = value\n    elseif name:sub(1, 1) ~= \":\" then\n      call[\"x-x402-response-\" .. name] = value\n    end\n  end\n  local body = \"\"\n  local length = tonumber(headers:get(\"content-length\"))\n  local status = headers:get(\":status\")\n  if (length ~= nil and length <= limit) or status == \"204\" or status == \"304\" then\n    state.read = true\n    local buffered = response:body()\n    if keep == 1 then\n      if buffered ~= nil then body = buffered:getBytes(0, buffered:length()) end\n      call[\"x-x402-body\"] = \"whole\"\n    end\n  end\n  local answer, replacement = response:httpCall(\"x402_authz_http\", call, body, timeout)\n  local answered = answer[\":status\"]\n  if answered ~= \"200\" then return fail(response, state.read, \"call_\" .. tostring(answered)) end\n  local set = {}\n  for name, value in pairs(answer) do\n    if name:sub(1, 11) == \"x-x402-set-\" then\n      set[name:sub(12)] = value\n    end\n  end\n  local instead = answer[\"x-x402-replace\"]\n  if instead ~= nil then return replace(response, state.read, instead, replacement or \"\", set) end\n  -- (handles taken before a yield are void after it: the headers are asked for again)\n  headers = response:headers()\n  for name, value in pairs(set) do headers:replace(name, value) end\n  if answer[\"x-x402-replace-body\"] ~= nil then\n    if not state.read then error(\"a body to replace that was not read\") end\n    headers:replace(\"content-length\", tostring(#replacement))\n    response:body(true):setBytes(replacement)\n  end\n  local removed = answer[\"x-x402-remove\"]\n  if removed ~= nil then\n    for name in removed:gmatch(\"[^,]+\") do headers:remove(name) end\n  end\nend\n\n-- A script error would let the response through as it is: caught, it is the typed 503.\nfunction envoy_on_response(response)\n  local state = {read = false}\n  local ok, err = pcall(phase, response, state)\n  if not ok then\n    response:logErr(\"x402 response phase: \" .. tostring(err))\n    fail(response, state.read, \"error\")\n  end\nend\n",
  "phaseDropLua": "function envoy_on_response(response)\n  local headers = response:headers()\n  local replacement = headers:get(\"x-x402-drop\")\n  if replacement == nil then return end\n  headers:remove(\"x-x402-drop\")\n  local first = true\n  for chunk in response:bodyChunks() do\n    chunk:setBytes(first and replacement or \"\")\n    first = false\n  end\nend\n",
  "phaseCallKeepMark": "@KEEP@",
  "phaseCallTimeoutMark": "@TIMEOUT_MS@",
  "mcpRouteKey": "mcp",
  "extMcpTools": "x402.mcp_tools",
  "extMcpDefault": "x402.mcp_default",
  "mcpFree": "free",
  "mcpRequestBody": {
    "max_request_bytes": 65536,
    "allow_partial_message": false,
    "pack_as_bytes": true
  },
  "mcpBufferBytes": 1048576,
  "mcpHeldProcessingMode": {
    "request_header_mode": "SKIP",
    "response_header_mode": "SEND",
    "request_body_mode": "NONE",
    "response_body_mode": "BUFFERED",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP"
  },
  "mcpChargedProcessingMode": {
    "request_header_mode": "SKIP",
    "response_header_mode": "SEND",
    "request_body_mode": "NONE",
    "response_body_mode": "BUFFERED_PARTIAL",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP"
  },
  "localReplies": [
    {
      "filter": {
        "metadata_filter": {
          "matcher": {
            "filter": "envoy.filters.http.ext_authz",
            "path": [
              {
                "key": "x402"
              }
            ],
            "value": {
              "string_match": {
                "exact": "unavailable"
              }
            }
          },
          "match_if_key_not_found": false
        }
      },
      "status_code": 503
    },
    {
      "filter": {
        "metadata_filter": {
          "matcher": {
            "filter": "envoy.filters.http.ext_authz",
            "path": [
              {
                "key": "x402"
              }
            ],
            "value": {
              "string_match": {
                "exact": "answered"
              }
            }
          },
          "match_if_key_not_found": false
        }
      },
      "status_code": 200
    },
    {
      "filter": {
        "metadata_filter": {
          "matcher": {
            "filter": "envoy.filters.http.ext_authz",
            "path": [
              {
                "key": "x402"
              }
            ],
            "value": {
              "present_match": true
            }
          },
          "match_if_key_not_found": false
        }
      }
    },
    {
      "filter": {
        "response_flag_filter": {
          "flags": [
            "UAEX"
          ]
        }
      },
      "status_code": 503,
      "headers_to_add": [
        {
          "header": {
            "key": "cache-control",
            "value": "no-store"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        },
        {
          "header": {
            "key": "retry-after",
            "value": "1"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        }
      ],
      "body_format_override": {
        "json_format": {
          "error": "authz_unavailable",
          "message": "the payment check is unavailable; retry shortly"
        },
        "content_type": "application/json"
      }
    },
    {
      "filter": {
        "extension_filter": {
          "name": "envoy.access_loggers.extension_filters.cel",
          "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
            "expression": "response.code_details.startsWith('ext_proc_error')"
          }
        }
      },
      "status_code": 503,
      "headers_to_add": [
        {
          "header": {
            "key": "cache-control",
            "value": "no-store"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        },
        {
          "header": {
            "key": "retry-after",
            "value": "1"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        }
      ],
      "body_format_override": {
        "json_format": {
          "error": "response_phase_unavailable",
          "message": "the payment could not be completed; nothing was charged, retry shortly",
          "details": "%RESPONSE_CODE_DETAILS%"
        },
        "content_type": "application/json"
      }
    },
    {
      "filter": {
        "response_flag_filter": {
          "flags": [
            "UT"
          ]
        }
      },
      "status_code": 504,
      "headers_to_add": [
        {
          "header": {
            "key": "cache-control",
            "value": "no-store"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        }
      ],
      "body_format_override": {
        "json_format": {
          "error": "upstream_timeout",
          "message": "the service did not answer in time"
        },
        "content_type": "application/json"
      }
    },
    {
      "filter": {
        "response_flag_filter": {
          "flags": [
            "UF",
            "UH",
            "URX",
            "UO",
            "UC",
            "UR"
          ]
        }
      },
      "status_code": 503,
      "headers_to_add": [
        {
          "header": {
            "key": "cache-control",
            "value": "no-store"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        },
        {
          "header": {
            "key": "retry-after",
            "value": "1"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        }
      ],
      "body_format_override": {
        "json_format": {
          "error": "upstream_unavailable",
          "message": "the service is unavailable; retry shortly"
        },
        "content_type": "application/json"
      }
    },
    {
      "filter": {
        "status_code_filter": {
          "comparison": {
            "op": "EQ",
            "value": {
              "default_value": 408,
              "runtime_key": "x402.local_reply.408"
            }
          }
        }
      },
      "headers_to_add": [
        {
          "header": {
            "key": "cache-control",
            "value": "no-store"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        }
      ],
      "body_format_override": {
        "json_format": {
          "error": "request_timeout",
          "message": "the request did not arrive in time"
        },
        "content_type": "application/json"
      }
    },
    {
      "filter": {
        "status_code_filter": {
          "comparison": {
            "op": "EQ",
            "value": {
              "default_value": 431,
              "runtime_key": "x402.local_reply.431"
            }
          }
        }
      },
      "headers_to_add": [
        {
          "header": {
            "key": "cache-control",
            "value": "no-store"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        }
      ],
      "body_format_override": {
        "json_format": {
          "error": "headers_too_large",
          "message": "the request headers are too large"
        },
        "content_type": "application/json"
      }
    },
    {
      "filter": {
        "status_code_filter": {
          "comparison": {
            "op": "EQ",
            "value": {
              "default_value": 413,
              "runtime_key": "x402.local_reply.413"
            }
          }
        }
      },
      "headers_to_add": [
        {
          "header": {
            "key": "cache-control",
            "value": "no-store"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        }
      ],
      "body_format_override": {
        "json_format": {
          "error": "body_too_large",
          "message": "the request body is too large"
        },
        "content_type": "application/json"
      }
    },
    {
      "filter": {
        "status_code_filter": {
          "comparison": {
            "op": "EQ",
            "value": {
              "default_value": 400,
              "runtime_key": "x402.local_reply.400"
            }
          }
        }
      },
      "headers_to_add": [
        {
          "header": {
            "key": "cache-control",
            "value": "no-store"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        }
      ],
      "body_format_override": {
        "json_format": {
          "error": "bad_request",
          "message": "the request is malformed",
          "details": "%RESPONSE_CODE_DETAILS%"
        },
        "content_type": "application/json"
      }
    },
    {
      "filter": {
        "response_flag_filter": {}
      },
      "headers_to_add": [
        {
          "header": {
            "key": "cache-control",
            "value": "no-store"
          },
          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
        }
      ],
      "body_format_override": {
        "json_format": {
          "error": "gateway_error",
          "message": "the gateway could not serve this request",
          "details": "%RESPONSE_CODE_DETAILS%"
        },
        "content_type": "application/json"
      }
    }
  ]
}
{{- end }}
