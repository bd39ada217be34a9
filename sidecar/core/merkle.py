"""A SHA-256 Merkle tree as in Certificate Transparency (RFC 9162 §2.1). Pure.

Leaves and inner nodes are hashed with different one-byte prefixes (0x00, 0x01), so no
inner node can pass for a leaf (the second-preimage attack on naive Merkle trees). The
tree over n leaves splits at the largest power of two below n; equivalently, built bottom
up, an odd last node is promoted to the next level unchanged (never paired with itself,
which would let two different leaf lists share a root).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF_PREFIX, NODE_PREFIX = b"\x00", b"\x01"
ALGORITHM = "sha256-rfc9162"  # named in batch manifests, so a verifier knows the rules


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


class MerkleTree:
    """All levels kept in memory: a batch is at most a few thousand leaves."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        """`leaves` are the leaf data (not yet hashed), in order."""
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        level = [leaf_hash(data) for data in leaves]
        self.levels = [level]
        while len(level) > 1:
            paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                paired.append(level[-1])  # promoted, not hashed with itself
            level = paired
            self.levels.append(level)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def proof(self, index: int) -> list[bytes]:
        """The inclusion path of leaf `index`, bottom up (RFC 9162 §2.1.3.1)."""
        if not 0 <= index < self.size:
            raise IndexError(f"leaf {index} is not in a tree of {self.size}")
        path = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):  # no sibling: the node was promoted at this level
                path.append(level[sibling])
            index >>= 1
        return path


def root_from_path(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """The root that `path` leads to from the leaf hash `leaf`, or None if the path cannot
    belong to leaf `index` of a tree of `size` leaves (RFC 9162 §2.1.3.2)."""
    if not 0 <= index < size:
        return None
    fn, sn, node = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            return None  # a path longer than the tree is high
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    return node if sn == 0 else None


def verify(leaf_data: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """Whether `leaf_data` is leaf `index` of the tree of `size` leaves with this root."""
    return root_from_path(leaf_hash(leaf_data), index, size, path) == root
