// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title The settlement batches of one x402 gateway, anchored on chain.
/// @notice The operator's key writes each batch's Merkle root once, under the batch's key
/// (sha256 of its id, docs/protocol.md "Anchors"); nobody can change or remove it. Anyone
/// proves a receipt by reading `roots(key)` and checking the receipt's inclusion proof.
contract BatchAnchor {
    /// The only address that may anchor: whoever deployed this contract.
    address public operator;

    /// Each batch's Merkle root (RFC 9162, SHA-256); zero: not anchored.
    mapping(bytes32 => bytes32) public roots;

    event Anchored(bytes32 indexed batchKey, bytes32 root);

    error NotOperator(address sender);
    error ZeroRoot();
    error AlreadyAnchored(bytes32 batchKey, bytes32 root);

    constructor() {
        operator = msg.sender;
    }

    /// Record `root` under `batchKey`. Again with the same root: a no-op (false), so a
    /// batch re-published after a crash costs nothing but gas; with another root: reverts.
    function anchor(bytes32 batchKey, bytes32 root) external returns (bool) {
        if (msg.sender != operator) revert NotOperator(msg.sender);
        if (root == bytes32(0)) revert ZeroRoot();
        bytes32 known = roots[batchKey];
        if (known == root) return false;
        if (known != bytes32(0)) revert AlreadyAnchored(batchKey, known);
        roots[batchKey] = root;
        emit Anchored(batchKey, root);
        return true;
    }
}
