"""Several settlements in flight for `x402 facilitator serve` (tools/facilitator.py).

The official `FacilitatorWeb3Signer` keeps each settlement's thread polling for its own
receipt every 100 ms, and a send the node refuses leaves its nonce a gap. Here, for the
operator key this process signs with:

- **Nonces** are the official counter's (the node's pending count or one past the last
  this process used, whichever is higher, under a lock: another process sharing the key
  is seen), and a transaction the node refuses resets it to the node's count, so the gap
  its nonce would leave (every later transaction stuck behind it) is filled by the next.
- **RPC calls** go over one pooled session sized for THREADS, and the chain id is asked once
  (rpc_client).
- **Receipts** are awaited by one watcher thread: every `poll` seconds one JSON-RPC batch
  asks for all the receipts still awaited; each settling thread sleeps on its own event
  and reads its receipt (the official way) once it exists. No settlement waits for another.

Verification, the transfer's encoding and the receipt's checks stay the official package's
(`ExactEvmFacilitatorScheme` over this signer).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from web3 import Web3
from web3.exceptions import TimeExhausted
from web3.middleware import ExtraDataToPOAMiddleware
from web3.types import RPCEndpoint
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.types import TransactionReceipt

POLL_SECONDS = 0.01  # anvil mines at once; a real chain's block time dwarfs it
THREADS = 64  # blocking web3 calls in flight (each settlement holds one while it waits)


class ReceiptWatcher:
    """One thread polling, in one batch, for every receipt a settlement awaits."""

    def __init__(self, rpc_url: str, poll: float = POLL_SECONDS) -> None:
        self.rpc_url, self.poll = rpc_url, poll
        self.waiting: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        threading.Thread(target=self._run, name="receipts", daemon=True).start()

    def wait(self, tx_hash: str, timeout: float) -> bool:
        """Block until `tx_hash` has a receipt (True) or `timeout` passed (False)."""
        event = threading.Event()
        with self.lock:
            self.waiting[tx_hash] = event
        self.wake.set()
        try:
            return event.wait(timeout)
        finally:
            with self.lock:
                self.waiting.pop(tx_hash, None)

    def _run(self) -> None:
        while True:
            self.wake.wait()
            with self.lock:
                hashes = list(self.waiting)
                if not hashes:
                    self.wake.clear()
                    continue
            try:
                mined = self._mined(hashes)
            except Exception:  # the node is away: the waiters' own timeouts decide
                mined = set()
            with self.lock:
                for tx_hash in mined:
                    event = self.waiting.get(tx_hash)
                    if event is not None:
                        event.set()
            time.sleep(self.poll)

    def _mined(self, hashes: list[str]) -> set[str]:
        batch = [
            {"jsonrpc": "2.0", "id": i, "method": "eth_getTransactionReceipt", "params": [h]}
            for i, h in enumerate(hashes)
        ]
        request = urllib.request.Request(  # noqa: S310 (the operator's own RPC URL)
            self.rpc_url, json.dumps(batch).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            answers: Any = json.loads(response.read())
        if not isinstance(answers, list):
            return set()
        return {
            hashes[answer["id"]]
            for answer in answers
            if isinstance(answer, dict) and answer.get("result") and answer.get("id") is not None
        }


def rpc_client(rpc_url: str) -> Web3:
    """The official signer's Web3, minus two costs per call that only concurrency shows:
    web3's validation middleware asks the node for its chain id before every call and
    transaction (cached here: a node's chain id never changes), and requests' default pool
    keeps 10 connections, so most of THREADS callers opened a new one each time."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_maxsize=THREADS)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    provider = Web3.HTTPProvider(
        rpc_url,
        session=session,
        cache_allowed_requests=True,
        cacheable_requests={RPCEndpoint("eth_chainId")},
    )
    w3 = Web3(provider)
    w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)  # as the official signer
    return w3


class ConcurrentSigner(FacilitatorWeb3Signer):
    """The official signer with local nonces and the shared receipt watcher."""

    def __init__(self, private_key: str, rpc_url: str, **options: Any) -> None:
        super().__init__(private_key, rpc_url, **options)
        self._w3 = rpc_client(rpc_url)
        self._receipts = ReceiptWatcher(rpc_url)

    def _resync(self) -> None:
        """The node refused a transaction: its nonce is unused, so the next one takes the
        node's count again (the official counter only ever moves up, past the gap)."""
        with self._nonce_lock:
            self._next_nonce = None

    def send_transaction(self, to: str, data: bytes) -> str:
        try:
            return super().send_transaction(to, data)
        except Exception:
            self._resync()
            raise

    def write_contract(
        self,
        address: str,
        abi: list[dict[str, Any]],
        function_name: str,
        *args: Any,
        data_suffix: str | None = None,
    ) -> str:
        try:
            return super().write_contract(
                address, abi, function_name, *args, data_suffix=data_suffix
            )
        except Exception:
            self._resync()
            raise

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        if not tx_hash.startswith("0x"):
            tx_hash = "0x" + tx_hash
        if not self._receipts.wait(tx_hash, self._confirmation_timeout_seconds):
            raise TimeExhausted(f"no receipt for {tx_hash} yet")  # the scheme: pending
        return super().wait_for_transaction_receipt(tx_hash)  # mined: the official read
