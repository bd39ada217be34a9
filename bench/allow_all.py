"""The floor of any Python ext_authz design: the sidecar's server model doing no work.

Same model as `x402 serve`: workers forked before gRPC exists, worker i on port + i,
uvloop, grpc.aio, the CheckRequest parsed by the framework and the answer sent as bytes;
each check is answered with one prebuilt OK. The bench's ratio of paid requests to this
isolates the sidecar's own cost from gRPC's and Envoy's.

    python -m bench.allow_all --port 9001 --workers 2 [--transport http]

With `--transport http` it is the HTTP transport's floor instead: server/authz/http_transport.py's
connection protocol (httptools, keep-alive) answering every check with one prebuilt 200.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys

from envoy.service.auth.v3 import external_auth_pb2 as authz
from google.rpc import code_pb2, status_pb2

from sidecar.server.authz import http_transport
from sidecar.server.authz.check import Facts
from sidecar.server.authz.grpc_transport import AUTHZ_SERVICE
from sidecar.server.authz.http_transport import HttpAnswers

OK: bytes = authz.CheckResponse(status=status_pb2.Status(code=code_pb2.OK)).SerializeToString()


async def check(request: authz.CheckRequest, context: object) -> bytes:
    return OK


class AllowAll:
    """The HTTP transport's decider, doing nothing."""

    async def decide(self, facts: Facts) -> bytes:
        return HttpAnswers.free


async def serve_http(host: str, port: int) -> None:
    server = await http_transport.serve(AllowAll(), host, port, 0)
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.drain(1)


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
    gc.freeze()  # as the sidecar's workers do, so the floor pays no more GC than they do
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
    parser.add_argument("--transport", choices=("grpc", "http"), default="grpc")
    args = parser.parse_args()
    import uvloop

    children = []
    for worker in range(args.workers):
        pid = os.fork()  # before any gRPC object exists, like the sidecar
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if args.transport == "http":
                uvloop.run(serve_http(args.host, args.port + worker))
            else:
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
