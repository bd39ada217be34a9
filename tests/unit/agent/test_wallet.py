"""The agent wallet: key loading, guards and budget accounting (no network)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sidecar.agent.wallet import Wallet
from sidecar.core.errors import (
    AmountError,
    AssetNotAllowed,
    BudgetExceeded,
    ConfigError,
    GuardRefused,
    MaxAmountExceeded,
    PayeeNotAllowed,
)
from sidecar.core.identity import Identity


def test_from_env_prefers_the_key_text_then_the_key_file(tmp_path: Path) -> None:
    text, on_disk = Identity.generate(), Identity.generate()
    on_disk.save(tmp_path / "agent.key")
    file_env = {"X402_WALLET_FILE": str(tmp_path / "agent.key")}
    assert Wallet.from_env(file_env).public_key == on_disk.public_key
    both = {**file_env, "X402_WALLET": text.seed_text}
    assert Wallet.from_env(both).public_key == text.public_key
    assert Wallet.load(tmp_path / "agent.key").public_key == on_disk.public_key


def test_a_missing_or_bad_wallet_is_a_readable_error_without_the_secret() -> None:
    with pytest.raises(ConfigError, match="x402 keygen"):
        Wallet.from_env({})
    with pytest.raises(ConfigError, match="X402_WALLET") as bad:
        Wallet.from_env({"X402_WALLET": "not-a-key-but-secret-ish"})
    assert "secret-ish" not in str(bad.value)
    assert "Wallet(payer=" in repr(Wallet.generate())
    assert Wallet.generate().identity.seed_text not in repr(Wallet.generate())


def test_guard_amounts_are_decimal_strings_never_floats() -> None:
    with pytest.raises(AmountError, match="max_amount"):
        Wallet.generate(max_amount="0.1.2")
    with pytest.raises(AmountError, match="budget"):
        Wallet.generate(budget="-1")
    with pytest.raises(AmountError):
        Wallet.generate(max_amount=0.5)


@pytest.mark.parametrize(
    ("guards", "asset", "amount", "payee", "error"),
    [
        ({"max_amount": "0.10"}, "USDF", "0.25", "gw_a", MaxAmountExceeded),
        ({"budget": "0.2"}, "USDF", "0.25", "gw_a", BudgetExceeded),
        ({"assets": ["USDF"]}, "EURF", "0.25", "gw_a", AssetNotAllowed),
        ({"payees": "gw_a"}, "USDF", "0.25", "gw_b", PayeeNotAllowed),
    ],
)
def test_each_guard_refuses_with_a_typed_error_naming_it(
    guards: dict[str, object], asset: str, amount: str, payee: str, error: type[GuardRefused]
) -> None:
    wallet = Wallet.generate(**guards)
    with pytest.raises(error) as refused:
        wallet.reserve(asset, amount, payee)
    assert refused.value.guard in str(refused.value)
    assert wallet.spent(asset) == "0"


def test_limits_are_inclusive_and_exact_at_any_precision() -> None:
    wallet = Wallet.generate(max_amount="0.25", budget="0.000000000000000003")
    wallet.reserve("USDF", "0.000000000000000001", "gw").commit()
    wallet.reserve("USDF", "0.000000000000000002", "gw").commit()
    with pytest.raises(BudgetExceeded):
        wallet.reserve("USDF", "0.000000000000000001", "gw")
    assert wallet.spent() == "0.000000000000000003"
    assert wallet.remaining() == "0"
    assert Wallet.generate(max_amount="0.25").reserve("USDF", "0.250", "gw").display == "0.25"


def test_released_money_returns_to_the_budget_and_settling_twice_is_a_no_op() -> None:
    wallet = Wallet.generate(budget="1")
    first = wallet.reserve("USDF", "0.6", "gw")
    with pytest.raises(BudgetExceeded):
        wallet.reserve("USDF", "0.6", "gw")  # the reservation counts before it is spent
    first.release()
    first.commit()  # already settled: ignored
    second = wallet.reserve("USDF", "0.6", "gw")
    second.commit()
    second.commit()
    assert (wallet.spent(), wallet.remaining()) == ("0.6", "0.4")
    assert wallet.spent("EURF") == "0"
    assert Wallet.generate().remaining() is None


def test_budgets_are_per_asset() -> None:
    wallet = Wallet.generate(budget="1")
    wallet.reserve("USDF", "1", "gw").commit()
    wallet.reserve("EURF", "1", "gw").commit()
    with pytest.raises(BudgetExceeded):
        wallet.reserve("USDF", "0.000001", "gw")


def test_threads_racing_for_the_budget_never_overspend() -> None:
    wallet = Wallet.generate(budget="0.05")
    granted: list[int] = []
    refused: list[int] = []
    barrier = threading.Barrier(16)

    def agent() -> None:
        barrier.wait()
        for _ in range(50):
            try:
                reservation = wallet.reserve("USDF", "0.001", "gw")
            except BudgetExceeded:
                refused.append(1)
            else:
                reservation.commit()
                granted.append(1)

    threads = [threading.Thread(target=agent) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(granted), len(refused)) == (50, 16 * 50 - 50)
    assert wallet.spent() == "0.05"
