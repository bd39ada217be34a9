"""The sidecar with the paid hot path as it was before the outcome record (issue #23), for
the bench's side-by-side phases (4r)/(4n) only: `python -m bench.before_record serve
--config FILE`.

The debit script of before (no retry lookup, no outcome hash), fed the arguments of today's
(ledger/lua/debit.lua): so (4n) over (4r) is the cost of recording each payment's outcome
in the same script as its charge, measured in one run on one machine. Everything else is
the product's; the supervisor forks its workers, so they run this script too.
"""

from __future__ import annotations

import runpy

from sidecar.ledger import scripts
from sidecar.ledger.pipe import Script

# lua/debit.lua before the record: KEYS[4] and ARGV[6]-ARGV[10] go unused.
BEFORE = """
local account, nonce_key, receipts = KEYS[1], KEYS[2], KEYS[3]
local asset, amount, receipt_id = ARGV[2], tonumber(ARGV[3]), ARGV[5]

local refused = past_deadline(ARGV[1], clock_ms())
  or charge_refused(account, nonce_key, asset, amount)
if refused then return refused end

local left = redis.call('HINCRBY', account, 'balance:' .. asset, '-' .. ARGV[3])
redis.call('HINCRBY', account, 'debited:' .. asset, ARGV[3])
redis.call('SET', nonce_key, receipt_id)
redis.call('EXPIREAT', nonce_key, ARGV[4])
redis.call('XADD', receipts, '*', 'receipt_id', receipt_id, 'balance',
  string.format('%d', left), unpack(ARGV, 11))
return {'ok', left}
"""


def main() -> None:
    scripts.DEBIT = Script(scripts.source("money") + BEFORE)
    runpy.run_module("sidecar.tools.cli", run_name="__main__")


if __name__ == "__main__":
    main()
