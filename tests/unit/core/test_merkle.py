"""The Merkle tree of settlement batches: RFC 9162 roots, inclusion proofs, tampering."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import merkle
from sidecar.core.merkle import MerkleTree


def reference_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 MTH, written recursively as the RFC states it."""
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(
        b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:])
    ).digest()


def reference_path(index: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(m, D[n])."""
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if index < k:
        return [*reference_path(index, leaves[:k]), reference_root(leaves[k:])]
    return [*reference_path(index - k, leaves[k:]), reference_root(leaves[:k])]


leaf_lists = st.lists(st.binary(max_size=40), min_size=1, max_size=70)


@given(leaf_lists)
def test_root_and_every_path_match_the_rfc(leaves: list[bytes]) -> None:
    tree = MerkleTree(leaves)

    assert tree.root == reference_root(leaves)
    for index, data in enumerate(leaves):
        path = tree.proof(index)
        assert path == reference_path(index, leaves)
        assert merkle.verify(data, index, len(leaves), path, tree.root)


def test_known_vector() -> None:
    # One leaf: the root is the leaf hash itself, with its 0x00 prefix.
    assert MerkleTree([b""]).root.hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )


@given(leaf_lists, st.data())
def test_a_changed_leaf_or_index_or_path_does_not_verify(
    leaves: list[bytes], data: st.DataObject
) -> None:
    tree = MerkleTree(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    path = tree.proof(index)

    assert not merkle.verify(leaves[index] + b"x", index, len(leaves), path, tree.root)
    if len(leaves) > 1:
        other = data.draw(st.integers(0, len(leaves) - 1).filter(lambda i: i != index))
        if leaves[other] != leaves[index]:
            assert not merkle.verify(leaves[index], other, len(leaves), path, tree.root)
        assert not merkle.verify(leaves[index], index, len(leaves), path[:-1], tree.root)
        assert not merkle.verify(leaves[index], index, len(leaves), [*path, path[0]], tree.root)
        flipped = [bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]]
        assert not merkle.verify(leaves[index], index, len(leaves), flipped, tree.root)


def test_an_inner_node_cannot_pass_for_a_leaf() -> None:
    leaves = [b"a", b"b", b"c", b"d"]
    tree = MerkleTree(leaves)
    inner = tree.levels[1][0]  # node_hash(leaf a, leaf b)

    # Presented as the data of a 2-leaf tree's leaf, it hashes with the leaf prefix.
    assert not merkle.verify(inner, 0, 2, [tree.levels[1][1]], tree.root)


def test_a_dropped_or_duplicated_leaf_changes_the_root() -> None:
    leaves = [b"r1", b"r2", b"r3"]
    root = MerkleTree(leaves).root

    assert MerkleTree(leaves[:2]).root != root
    assert MerkleTree([*leaves, leaves[-1]]).root != root  # odd nodes are promoted, not doubled


def test_bad_indexes() -> None:
    tree = MerkleTree([b"a", b"b"])
    with pytest.raises(IndexError):
        tree.proof(2)
    with pytest.raises(ValueError, match="at least one leaf"):
        MerkleTree([])
    assert merkle.root_from_path(b"x" * 32, 2, 2, []) is None
