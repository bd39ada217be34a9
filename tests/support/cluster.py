"""Helpers for tests on a real Redis Cluster (tests/test_cluster.py and the durability
tests): plain connections to one node, the slot map as the nodes say it, resharding by hand."""

from __future__ import annotations

import redis.asyncio as aioredis

from sidecar.tools.stack import LOOPBACK


def node(port: int) -> aioredis.Redis:
    """A plain connection to one cluster node, to see where keys really live."""
    return aioredis.Redis(host=LOOPBACK, port=port, decode_responses=True)


async def slot_owners(port: int) -> dict[int, int]:
    """Slot → port of its master, as the cluster itself says (CLUSTER SLOTS)."""
    async with node(port) as any_node:
        ranges = await any_node.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    owners = {}
    for start, end, master, *_replicas in ranges:
        owners.update(dict.fromkeys(range(int(start), int(end) + 1), int(master[1])))
    return owners


async def migrate(source: int, target: int, slot: int, others: list[int]) -> None:
    """Move one slot between masters by hand, as `redis-cli --cluster reshard` does."""
    async with node(source) as src, node(target) as dst:
        src_id, dst_id = await src.cluster("MYID"), await dst.cluster("MYID")
        await dst.cluster("SETSLOT", slot, "IMPORTING", src_id)
        await src.cluster("SETSLOT", slot, "MIGRATING", dst_id)
        keys = await src.cluster("GETKEYSINSLOT", slot, 1000)
        await src.execute_command("MIGRATE", LOOPBACK, target, "", 0, 5000, "KEYS", *keys)  # type: ignore[no-untyped-call]


async def finish_migration(target: int, slot: int, ports: list[int]) -> None:
    async with node(target) as dst:
        dst_id = await dst.cluster("MYID")
    for port in [target, *(p for p in ports if p != target)]:
        async with node(port) as master:
            await master.cluster("SETSLOT", slot, "NODE", dst_id)
