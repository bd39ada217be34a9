"""The reference facilitator of (12): the official x402 facilitator as the official package's
own example runs it, for the bench to compare `x402 facilitator serve` against.

The shape of coinbase/x402's `examples/python/facilitator`: a FastAPI app under uvicorn,
one process, the async `x402Facilitator` with `register_exact_evm_facilitator` on the
official `FacilitatorWeb3Signer` (its own nonce counter, each settlement waiting for its
receipt), `POST /verify`, `POST /settle`, `GET /supported`, `GET /health`. Nothing here is
tuned: it is the reference a seller would otherwise pick.

    python -m bench.reference_facilitator --rpc-url URL --key-file F --network N --port P
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from x402 import x402Facilitator
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.schemas import PaymentRequirements, parse_payment_payload

from sidecar.core.identity import read_evm_key


def app(rpc_url: str, key: str, network: str) -> FastAPI:
    signer = FacilitatorWeb3Signer(private_key=key, rpc_url=rpc_url)
    facilitator = register_exact_evm_facilitator(x402Facilitator(), signer, networks=network)
    served = FastAPI(title="x402 reference facilitator")

    def parsed(body: dict[str, Any]) -> tuple[Any, PaymentRequirements]:
        try:
            payload = parse_payment_payload(body["paymentPayload"])
            return payload, PaymentRequirements.model_validate(body["paymentRequirements"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

    @served.post("/verify")
    async def verify(body: dict[str, Any]) -> dict[str, Any]:
        result = await facilitator.verify(*parsed(body))
        return result.model_dump(by_alias=True, exclude_none=True)

    @served.post("/settle")
    async def settle(body: dict[str, Any]) -> dict[str, Any]:
        result = await facilitator.settle(*parsed(body))
        return result.model_dump(by_alias=True, exclude_none=True)

    @served.get("/supported")
    async def supported() -> dict[str, Any]:
        return facilitator.get_supported().model_dump(by_alias=True, exclude_none=True)

    @served.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--network", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    key = read_evm_key(args.key_file, "--key-file")
    served = app(args.rpc_url, key, args.network)
    uvicorn.run(served, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
