"""The floor of any Python ext_authz design: the sidecar's server model doing no work.

Same model as `x402 serve`: workers forked before gRPC exists, worker i on port + i,
uvloop, grpc.aio, the CheckRequest parsed by the framework and the answer sent as bytes;
each check is answered with one prebuilt OK. The bench's ratio of paid requests to this
isolates the sidecar's own cost from gRPC's and Envoy's.

    python -m bench.allow_all --port 9001 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from envoy.service.auth.v3 import external_auth_pb2 as authz
from google.rpc import code_pb2, status_pb2

from sidecar.server.authz import AUTHZ_SERVICE

OK: bytes = authz.CheckResponse(status=status_pb2.Status(code=code_pb2.OK)).SerializeToString()


async def check(request: authz.CheckRequest, context: object) -> bytes:
    return OK


async def serve(address: str) -> None:
    import grpc

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(
        check, request_deserializer=authz.CheckRequest.FromString
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(AUTHZ_SERVICE, {"Check": handler}),)
    )
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    import uvloop

    children = []
    for worker in range(args.workers):
        pid = os.fork()  # before any gRPC object exists, like the sidecar
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            uvloop.run(serve(f"{args.host}:{args.port + worker}"))
            os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for _ in children:
        os.wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
