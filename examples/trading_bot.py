"""Lane 4: a trading bot on state channels, opened and closed by the bot itself.

The bot locks part of its own prepaid credit into one channel per worker with a request
signed by its key (`PaymentChannel.open`, no operator involved); each request to the
market-signal route then carries a signed voucher raising that channel's total (no
per-request state in Redis). The bot closes its channels itself (`channel.close()`): what
the vouchers spent is settled and the rest returns to its balance. It reports its
request rate and the refund.

    python examples/trading_bot.py
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import lanes

from sidecar.agent import ChannelAuth, PaymentChannel, receipt_of
from sidecar.core.money import to_atomic, to_decimal

WORKERS, DEPOSIT = 8, "1"
SYMBOLS = ["BTC", "ETH", "SOL", "EUR"]


def worker(url: str, channel: PaymentChannel, requests: int) -> None:
    with httpx.Client(auth=ChannelAuth(channel, strict=True), timeout=30) as http:
        for n in range(requests):
            response = http.get(f"{url}/api/v1/market/signal/{SYMBOLS[n % 4]}")
            response.raise_for_status()
            receipt = receipt_of(response)
            assert receipt is not None and receipt.verified


def lane(world: lanes.World, short: bool) -> dict[str, Any]:
    market = world.gateways["market"]
    wallet = world.wallet(max_amount="0.001")
    per_worker = 50 if short else 500
    # The bot opens its own channels from its prepaid balance, signed by its key.
    channels = [PaymentChannel.open(market.url, wallet, DEPOSIT) for _ in range(WORKERS)]

    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:  # one channel per thread: vouchers in order
        for done in [pool.submit(worker, market.url, c, per_worker) for c in channels]:
            done.result()
    seconds = time.perf_counter() - start
    requests = WORKERS * per_worker
    rate = requests / seconds
    print(f"{requests} paid requests in {seconds:.2f} s: {rate:.0f} req/s over {WORKERS} channels")
    spent = refund = 0
    for channel in channels:  # and closes them: the unspent deposit comes back
        closed = channel.close()
        spent += to_atomic(closed.spent, 6)
        refund += to_atomic(closed.refund, 6)
        print(f"channel {closed.channel_id}: spent {closed.spent}, refunded {closed.refund}")
    return {
        "lane": "channel",
        "payer": wallet.public_key,
        "requests": requests,
        "req_per_s": round(rate),
        "deposited": to_decimal(WORKERS * to_atomic(DEPOSIT, 6), 6),
        "spent": to_decimal(spent, 6),
        "refund": to_decimal(refund, 6),
    }


if __name__ == "__main__":
    lanes.run(lanes.SPECS["channel"], lane)
