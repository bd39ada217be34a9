"""Conservation of money under a seeded random workload against a real Redis.

Credits (some retried), paid requests from concurrent payers, replays, expired proofs and
suspensions run through the real servicer; afterwards no unit of money was created or
lost: credited = balance + debited for every payer, no balance was ever negative, and
receipts and debits match one to one. Longer: pytest tests/test_conservation.py
--conservation-ops 200000 --conservation-seed 7
"""

from __future__ import annotations

import pytest

from sidecar.tools.stack import Stack
from tests.support.conservation import run_and_check


async def test_money_is_conserved(stack: Stack, request: pytest.FixtureRequest) -> None:
    operations = int(request.config.getoption("--conservation-ops"))
    seed = int(request.config.getoption("--conservation-seed"))
    await run_and_check(stack, operations, seed)
