"""The official x402 stack, for `make bench` to measure beside the sidecar.

    .venv/bin/python -m bench.official --facilitator URL --network eip155:31337 \\
        --asset 0xTOKEN --pay-to 0xOPERATOR [--amount 1000] [--port 8402] [--workers 2]

A FastAPI app behind uvicorn with the official middleware of PyPI `x402`
(`x402.http.middleware.fastapi.payment_middleware`, an `x402ResourceServer` with the
official `exact` EVM server scheme and `HTTPFacilitatorClient`), one priced route
(`GET /api/v1/bench/paid`, `--amount` atomic units of the token, as the sidecar's bench
route) and a free `GET /health`. Every paid request is verified and then settled on chain
through the facilitator, as the official middleware does; nothing here is ours but the
wiring. `sign_envelopes` pre-signs what the official client sends for such a route's 402.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from x402 import x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient, PaymentOption, RouteConfig
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.schemas import AssetAmount, PaymentPayload, PaymentRequired

from sidecar.tools.onchain import exact_client, payment_signature, upto_client

PATH = "/api/v1/bench/paid"
CONFIG_VARIABLE = "X402_BENCH_OFFICIAL"  # how uvicorn's worker processes get the config


def create_app(config: dict[str, Any]) -> FastAPI:
    """The official middleware in front of one paid route and a free health route."""
    facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=config["facilitator"], timeout=60))
    server = x402ResourceServer(facilitator)
    # The official package's own annotations disagree with its scheme class (untyped
    # __init__, payment_flows' dict type); the call is the one its docs show.
    server.register(config["network"], ExactEvmServerScheme())  # type: ignore[no-untyped-call,arg-type]
    # Our token is not one the official package knows by address: the price is given in
    # atomic units with its EIP-712 domain, as its docs say for any other ERC-20.
    price = AssetAmount(
        amount=str(config["amount"]),
        asset=config["asset"],
        extra={"name": config["asset_name"], "version": config["asset_version"]},
    )
    routes = {
        f"GET {PATH}": RouteConfig(
            accepts=PaymentOption(
                scheme="exact",
                pay_to=config["pay_to"],
                price=price,
                network=config["network"],
                max_timeout_seconds=config["max_timeout_seconds"],
            ),
            description="bench paid route",
        )
    }
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    pay = payment_middleware(routes, server)

    @app.middleware("http")
    async def x402(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Any:
        return await pay(request, call_next)

    @app.get(PATH)
    async def paid() -> dict[str, str]:
        return {"ok": "paid"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def from_env() -> FastAPI:
    """uvicorn's factory in each worker process: the config the parent put in the env."""
    config: dict[str, Any] = json.loads(os.environ[CONFIG_VARIABLE])
    return create_app(config)


def sign_batch(job: tuple[str, str, str, str, int, int, str]) -> list[str]:
    required_json, network, token, key, cap, count, scheme = job
    required = PaymentRequired.model_validate_json(required_json)
    make = upto_client if scheme == "upto" else exact_client
    client = make(network, token, key, cap)

    async def sign() -> list[str]:
        headers = []
        for _ in range(count):  # a fresh nonce each (EIP-3009, or Permit2's)
            payload = await client.create_payment_payload(required)
            assert isinstance(payload, PaymentPayload)
            headers.append(payment_signature(payload))
        return headers

    return asyncio.run(sign())


def decode_required(header: str) -> PaymentRequired:
    """A 402's PAYMENT-REQUIRED header, as the official model reads it."""
    return PaymentRequired.model_validate_json(base64.b64decode(header))


def sign_jobs(
    required: PaymentRequired, network: str, token: str, keys: list[str], cap: int, count: int,
    scheme: str = "exact",
) -> list[tuple[str, str, str, str, int, int, str]]:  # fmt: skip
    """`count` payments (of the 402's `scheme` offer) spread over the payers' `keys`, as
    jobs for `sign_batch` (one per payer, so a pool signs them in parallel)."""
    text = required.model_dump_json(by_alias=True)
    each = -(-count // len(keys))
    return [(text, network, token, key, cap, each, scheme) for key in keys]


def main() -> None:
    parser = argparse.ArgumentParser(
        description="the official x402 FastAPI middleware in front of one paid route"
    )
    parser.add_argument("--facilitator", required=True, help="the facilitator's base URL")
    parser.add_argument("--network", required=True, help="CAIP-2, e.g. eip155:31337")
    parser.add_argument("--asset", required=True, help="the EIP-3009 token's address")
    parser.add_argument("--asset-name", default="USD Coin", help="its EIP-712 domain name")
    parser.add_argument("--asset-version", default="2", help="its EIP-712 domain version")
    parser.add_argument("--pay-to", required=True, help="the address that is paid")
    parser.add_argument("--amount", type=int, default=1000, help="price in atomic units")
    parser.add_argument("--max-timeout-seconds", type=int, default=600)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8402)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()
    config = {
        "facilitator": args.facilitator,
        "network": args.network,
        "asset": args.asset,
        "asset_name": args.asset_name,
        "asset_version": args.asset_version,
        "pay_to": args.pay_to,
        "amount": args.amount,
        "max_timeout_seconds": args.max_timeout_seconds,
    }
    os.environ[CONFIG_VARIABLE] = json.dumps(config)
    uvicorn.run(
        "bench.official:from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
        # uvicorn restarts a worker that misses a 5 s health ping: on a busy 2-core machine
        # that would cut paid requests mid-settle and count against the official stack.
        timeout_worker_healthcheck=60,
    )


if __name__ == "__main__":
    main()
