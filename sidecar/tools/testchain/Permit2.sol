// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

// A TEST DOUBLE of Uniswap's Permit2 (SignatureTransfer only), written by this project for
// anvil: Uniswap's bytecode cannot be installed from the registries the project uses. It is
// placed at Permit2's canonical address 0x000000000022D473030F116dDEE9F6B43aC78BA3 with
// anvil_setCode, so it has no constructor and no immutables: the EIP-712 domain separator
// is computed on each call from block.chainid and address(this).
//
// The interface it implements is the subset of ISignatureTransfer the x402 `upto` proxy
// calls, with Permit2's semantics: the EIP-712 domain {name: "Permit2", chainId,
// verifyingContract} (no version), the PermitWitnessTransferFrom type hash built from the
// caller's witness type string, spender = msg.sender, unordered nonces in a bitmap (each
// used once), a deadline, requestedAmount <= permitted.amount, and the token moved with the
// owner's ERC-20 allowance to this contract. Not implemented: AllowanceTransfer, batch
// transfers, invalidateUnorderedNonces, EIP-1271 signers, compact (64-byte) signatures.

interface IERC20Transfer {
    function transferFrom(address from, address to, uint256 amount) external returns (bool);
}

contract Permit2 {
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    error SignatureExpired(uint256 signatureDeadline);
    error InvalidAmount(uint256 maxAmount);
    error InvalidNonce();
    error InvalidSignature();
    error InvalidSigner();
    error TransferFailed();

    event UnorderedNonceInvalidation(address indexed owner, uint256 word, uint256 mask);

    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,uint256 chainId,address verifyingContract)");
    bytes32 private constant _NAME_HASH = keccak256("Permit2");
    bytes32 public constant TOKEN_PERMISSIONS_TYPEHASH =
        keccak256("TokenPermissions(address token,uint256 amount)");
    string public constant PERMIT_WITNESS_TRANSFER_FROM_TYPEHASH_STUB =
        "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,";

    mapping(address => mapping(uint256 => uint256)) public nonceBitmap;

    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, _NAME_HASH, block.chainid, address(this)));
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external {
        if (block.timestamp > permit.deadline) revert SignatureExpired(permit.deadline);
        if (transferDetails.requestedAmount > permit.permitted.amount) {
            revert InvalidAmount(permit.permitted.amount);
        }
        bytes32 typeHash =
            keccak256(abi.encodePacked(PERMIT_WITNESS_TRANSFER_FROM_TYPEHASH_STUB, witnessTypeString));
        bytes32 tokenPermissions = keccak256(
            abi.encode(TOKEN_PERMISSIONS_TYPEHASH, permit.permitted.token, permit.permitted.amount)
        );
        bytes32 dataHash = keccak256(
            abi.encode(typeHash, tokenPermissions, msg.sender, permit.nonce, permit.deadline, witness)
        );
        _useUnorderedNonce(owner, permit.nonce);
        _verify(signature, keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), dataHash)), owner);
        bool moved = IERC20Transfer(permit.permitted.token).transferFrom(
            owner, transferDetails.to, transferDetails.requestedAmount
        );
        if (!moved) revert TransferFailed();
    }

    function _useUnorderedNonce(address from, uint256 nonce) private {
        uint256 wordPos = nonce >> 8;
        uint256 bit = 1 << (nonce & 0xff);
        uint256 flipped = nonceBitmap[from][wordPos] ^= bit;
        if (flipped & bit == 0) revert InvalidNonce();
    }

    function _verify(bytes calldata signature, bytes32 digest, address claimedSigner) private pure {
        if (signature.length != 65) revert InvalidSignature();
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        address signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert InvalidSignature();
        if (signer != claimedSigner) revert InvalidSigner();
    }
}
