"""The ledger on Redis Cluster: the pipelined hot path routed by slot, redis-py for the rest.

`redis_url: redis+cluster://[[user]:password@]host:port[,host:port...]` names one or more
seed nodes; the rest of the cluster is discovered from them (CLUSTER SLOTS).

Every ledger script touches only keys under one payer's hash tag (`x402:{payer}:...`), so
each call goes to the one master that owns that slot. The hot path keeps its pipelined
client (redis_pipe.RedisPipe): one pipelined connection per master, chosen by the CRC16
slot of the first key. Admin calls, settlement and the CLI go through redis-py's
`RedisCluster`, which routes every command (and EVALSHA by its keys) the same way.

Redirections, all retried because Redis refuses them before a script runs, so a retry
never charges twice:
- `MOVED slot host:port`: the slot has a new owner (resharding, failover). The entry is
  fixed at once and the whole map reloaded in the background; the call goes there.
- `ASK slot host:port`: the slot is being migrated and a key is already on the target;
  the call is sent there once, preceded by ASKING on the same connection.
- `TRYAGAIN`: a multi-key script during a slot migration, with keys on both sides. Retried
  every few ms until `timeout`; then it fails closed like an unreachable Redis.
A lost connection reloads the map on the next call (a replica may have been promoted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from sidecar.ledger.pipe import (
    DEFAULT_PORT,
    TLS,
    TLS_PARAMS,
    Address,
    ConnectionFailed,
    RedisPipe,
    RedisPipeError,
    ReplyError,
    Script,
    check_query,
    tls_from_query,
)

SCHEME, TLS_SCHEME = "redis+cluster", "rediss+cluster"  # the second over TLS
MAX_REDIRECTS = 16  # MOVED/ASK hops in a row for one call; more: the cluster is in flux
TRYAGAIN_PAUSE = 0.005  # seconds between retries while a slot migrates
REFRESH_PAUSE = 0.25  # the slot map is reloaded at most this often after failures

Node = tuple[str, int]


def is_cluster_url(url: str) -> bool:
    return url.startswith((SCHEME + "://", TLS_SCHEME + "://"))


@dataclass(frozen=True)
class ClusterAddress:
    seeds: tuple[Node, ...]
    username: str = ""
    password: str = field(default="", repr=False)
    tls: TLS | None = None


def parse_cluster_url(url: str) -> ClusterAddress:
    """`redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0]`, or over TLS
    `rediss+cluster://…` with the query parameters of rediss:// (ssl_ca_certs, …)."""
    if not is_cluster_url(url):
        raise ValueError(f"a Redis Cluster URL starts with {SCHEME}:// or {TLS_SCHEME}://")
    scheme, _, rest = url.partition("://")
    rest, _, query_text = rest.partition("?")
    query = parse_qs(query_text)
    check_query(query, TLS_PARAMS)
    tls = tls_from_query(scheme.removesuffix("+cluster"), query)
    netloc, _, db = rest.partition("/")
    if db.strip("/") not in ("", "0"):
        raise ValueError("Redis Cluster has only database 0")
    credentials, _, hosts = netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    seeds = []
    for item in hosts.split(","):
        host, port = _node(item.strip())
        seeds.append((host, port))
    return ClusterAddress(tuple(seeds), unquote(username), unquote(password), tls)


def _node(text: str) -> Node:
    if not text:
        raise ValueError("a Redis Cluster URL needs host:port of at least one node")
    if text.startswith("["):  # [ipv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"Redis Cluster node {text!r}: bad port")
    return host, int(port) if port else DEFAULT_PORT


def client(url: str, timeout: float) -> RedisCluster:
    """redis-py's cluster client for everything but the hot path."""
    address = parse_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.seeds],
        username=address.username or None,
        password=address.password or None,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        health_check_interval=30,
        **tls_options(address.tls),
    )


def tls_options(tls: TLS | None) -> dict[str, Any]:
    """redis-py's keyword arguments for TLS (none without it)."""
    if tls is None:
        return {}
    return {
        "ssl": True,
        "ssl_ca_certs": tls.ca_file or None,
        "ssl_certfile": tls.cert_file or None,
        "ssl_keyfile": tls.key_file or None,
    }


def slot_of(key: str) -> int:
    """The cluster slot of a key: CRC16 of its hash tag (`{payer}`), as Redis computes it."""
    return key_slot(key.encode())


class ClusterPipe:
    """RedisPipe's calls, routed by slot to one pipelined connection per master."""

    def __init__(self, url: str, timeout: float = 0.5, scripts: tuple[Script, ...] = ()) -> None:
        self.address = parse_cluster_url(url)
        self.timeout = timeout
        self.scripts = scripts
        self._slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._pipes: dict[Node, RedisPipe] = {}
        self._loaded = False
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = -REFRESH_PAUSE
        self.last_error = ""  # why the last ping failed, for logs

    # -- the calls the ledger makes --------------------------------------------------------
    async def evalsha(
        self,
        script: Script,
        keys: tuple[str, ...],
        args: tuple[str | int, ...],
        late: Callable[[Any], None] | None = None,
    ) -> Any:
        """EVALSHA on the master that owns the keys' slot (all keys share one hash tag)."""
        slot = slot_of(keys[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        asking: Node | None = None
        redirects = 0
        while redirects < MAX_REDIRECTS:
            node = asking or await self._owner(slot)
            try:
                return await self._pipe(node).evalsha(
                    script, keys, args, late, asking=asking is not None
                )
            except ConnectionFailed:
                self._stale()  # a failover may have moved the slot: look again next call
                raise
            except ReplyError as exc:
                kind, target = _redirect(exc, node)
                if kind == "MOVED":
                    self._slots[slot], asking = target, None
                    self._refresh_soon()
                    redirects += 1
                elif kind == "ASK":
                    asking = target
                    redirects += 1
                elif kind == "TRYAGAIN" and loop.time() < deadline:
                    # Back to the owner, which says ASK again or, once moved, MOVED.
                    asking, redirects = None, 0
                    await asyncio.sleep(TRYAGAIN_PAUSE)
                else:
                    if kind == "CLUSTERDOWN":
                        self._stale()
                    raise
        raise ConnectionFailed("Redis Cluster redirected this call too often")

    async def ping(self) -> bool:
        """Every slot has a master and every master answers (readiness)."""
        try:
            if not self._loaded:
                await self._refresh()
        except RedisPipeError as exc:
            self.last_error = str(exc)
            return False
        masters = set(self._slots)
        if None in masters:
            self.last_error = "some slots have no master (CLUSTER SLOTS)"
            return False
        pipes = [self._pipe(node) for node in masters if node is not None]
        replies = await asyncio.gather(*(pipe.ping() for pipe in pipes))
        failed = [pipe.last_error for pipe, ok in zip(pipes, replies, strict=True) if not ok]
        self.last_error = "; ".join(failed)
        return not failed

    async def close(self) -> None:
        for pipe in self._pipes.values():
            await pipe.close()
        self._pipes.clear()

    def owner(self, key: str) -> Node | None:
        """The master this client sends `key`'s calls to (None before the map is loaded)."""
        return self._slots[slot_of(key)]

    async def master_of(self, key: str) -> Address:
        """The address of the master that owns `key`'s slot, for a connection of its own
        (a durable write and its WAITAOF must share one)."""
        return self._pipe(await self._owner(slot_of(key))).address

    async def masters(self) -> list[Address]:
        """Every master's address, as the slot map has them now."""
        if not self._loaded:
            await self._refresh()
        return [self._pipe(node).address for node in dict.fromkeys(self._slots) if node]

    def moved(self, key: str, host: str, port: int) -> None:
        """A connection of one's own was told `MOVED <slot> host:port` for `key`: the slot's
        entry is fixed at once, and the rest of the map reloaded in the background."""
        slot = slot_of(key)
        asked = self._slots[slot]
        self._slots[slot] = (host.strip("[]") or (asked[0] if asked else ""), port)
        self._refresh_soon()

    # -- the slot map ----------------------------------------------------------------------
    def _pipe(self, node: Node) -> RedisPipe:
        pipe = self._pipes.get(node)
        if pipe is None:
            host, port = node
            seed = self.address
            address = Address(host, port, "", seed.username, seed.password, 0, seed.tls)
            pipe = RedisPipe(address, timeout=self.timeout, scripts=self.scripts)
            self._pipes[node] = pipe
        return pipe

    async def _owner(self, slot: int) -> Node:
        node = self._slots[slot]
        if node is None:
            await self._refresh()
            node = self._slots[slot]
            if node is None:
                raise ConnectionFailed(f"no Redis Cluster master serves slot {slot}")
        return node

    def _stale(self) -> None:
        """Reload the map before the next call, unless it was reloaded a moment ago."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._refreshed_at >= REFRESH_PAUSE:
            self._loaded = False
            self._slots = [None] * REDIS_CLUSTER_HASH_SLOTS

    def _refresh_soon(self) -> None:
        """After a MOVED: the rest of the map is likely out of date too; reload it in the
        background while calls go on with the corrected entry."""
        loop = asyncio.get_running_loop()
        if self._refreshing is None and loop.time() - self._refreshed_at >= REFRESH_PAUSE:
            task = asyncio.ensure_future(self._refresh())
            task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _refresh(self) -> None:
        # Every caller arriving while the map is reloaded shares one CLUSTER SLOTS.
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._load())
            self._refreshing.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)

    def _refreshed(self, done: asyncio.Future[None]) -> None:
        self._refreshing = None
        self._refreshed_at = asyncio.get_running_loop().time()

    async def _load(self) -> None:
        known = [node for node in dict.fromkeys(self._slots) if node is not None]
        candidates = list(dict.fromkeys([*known, *self.address.seeds, *self._pipes]))
        for node in candidates:
            try:
                reply = await self._pipe(node).call("CLUSTER", "SLOTS")
            except RedisPipeError as exc:
                self.last_error = str(exc)
                continue
            slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            for start, end, master, *_replicas in reply:
                host = master[0] or node[0]  # an empty host: the address we asked
                owner = (host, int(master[1]))
                slots[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
            self._slots, self._loaded = slots, True
            return
        raise ConnectionFailed(f"no Redis Cluster node answered CLUSTER SLOTS ({self.last_error})")


def _redirect(error: ReplyError, node: Node) -> tuple[str, Node]:
    """`MOVED 3999 127.0.0.1:7001` → ("MOVED", ("127.0.0.1", 7001)); other errors → their
    first word and the node that sent them."""
    words = str(error).split()
    kind = words[0] if words else ""
    if kind in ("MOVED", "ASK") and len(words) == 3:
        host, _, port = words[2].rpartition(":")
        if port.isdigit():
            return kind, (host.strip("[]") or node[0], int(port))
    return kind, node
