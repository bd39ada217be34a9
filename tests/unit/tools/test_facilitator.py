"""`x402 facilitator serve`'s pieces that need no chain (the facilitator: tests/test_chain.py)."""

from __future__ import annotations

from sidecar.tools.facilitator import rpc_secrets, scrub


def test_messages_never_carry_the_rpc_urls_key() -> None:
    url = "https://base-mainnet.example/v2/k3yK3yK3y?token=s3cr3t"
    error = (
        f"HTTPSConnectionPool(host='base-mainnet.example'): url: /v2/k3yK3yK3y?token=s3cr3t ({url})"
    )
    cleaned = scrub(error, rpc_secrets(url))
    assert "k3yK3yK3y" not in cleaned and "s3cr3t" not in cleaned
    assert "base-mainnet.example" in cleaned  # the host says which provider failed
