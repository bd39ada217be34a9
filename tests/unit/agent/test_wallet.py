"""The agent wallet: key loading, guards and budget accounting (no network)."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from sidecar.agent.evm import EvmKey
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
    guards: dict[str, Any], asset: str, amount: str, payee: str, error: type[GuardRefused]
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


# -- the EVM key (the `evm` extra) --------------------------------------------------------

# anvil's first dev account: a public test key.
DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
DEV_ADDRESS = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


def test_an_evm_key_loads_from_the_environment_or_a_private_file(tmp_path: Path) -> None:
    key_file = tmp_path / "agent.evm"
    EvmKey.from_text(DEV_KEY).save(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Wallet.from_env({"X402_EVM_KEY": DEV_KEY}).evm is not None
    only_evm = Wallet.from_env({"X402_EVM_KEY_FILE": str(key_file)})
    assert only_evm.evm is not None and only_evm.evm.address == DEV_ADDRESS
    assert not only_evm.has_identity
    # The text wins over the file, as for the Ed25519 key.
    other = EvmKey.generate()
    both = Wallet.from_env({"X402_EVM_KEY": other.hex, "X402_EVM_KEY_FILE": str(key_file)})
    assert both.evm is not None and both.evm.address == other.address
    # Both keys in one wallet; a key file given explicitly beats the environment.
    ed25519 = Identity.generate()
    ed25519.save(tmp_path / "agent.key")
    wallet = Wallet.load(
        tmp_path / "agent.key", evm_key_file=key_file, env={"X402_EVM_KEY": other.hex}
    )
    assert wallet.public_key == ed25519.public_key
    assert wallet.evm is not None and wallet.evm.address == DEV_ADDRESS
    assert DEV_KEY[2:] not in repr(wallet) and DEV_ADDRESS in repr(wallet)


def test_a_wallet_without_an_ed25519_key_says_so_when_one_is_needed() -> None:
    wallet = Wallet(evm=EvmKey.from_text(DEV_KEY))
    with pytest.raises(ConfigError, match="no Ed25519 key"):
        _ = wallet.public_key
    with pytest.raises(ConfigError, match="a wallet needs a key"):
        Wallet()
    with pytest.raises(ConfigError, match="X402_EVM_KEY"):
        Wallet.from_env({})


def test_an_evm_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "agent.evm"
    key_file.write_text(DEV_KEY + "\n")
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as refused:
        Wallet.from_env({"X402_EVM_KEY_FILE": str(key_file)})
    assert DEV_KEY[2:] not in str(refused.value)


@pytest.mark.parametrize(
    "text",
    [
        "0x1234",  # too short
        "zz" * 32,  # not hex
        "0x" + "00" * 32,  # zero is no key
        "0x" + "ff" * 32,  # past secp256k1's order
    ],
)
def test_a_bad_evm_key_is_a_config_error_that_never_quotes_it(text: str) -> None:
    with pytest.raises(ConfigError) as bad:
        Wallet.from_env({"X402_EVM_KEY": text})
    assert text not in str(bad.value) and "X402_EVM_KEY" in str(bad.value)


def test_atomic_amounts_meet_the_same_guards_exactly() -> None:
    wallet = Wallet.generate(max_amount="0.01", budget="0.02", assets=["USDC"])
    token = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    # 10000 units of a 6-decimal token are 0.01: inclusive.
    wallet.reserve_atomic("USDC", 10_000, 6, "0xPayTo").commit()
    with pytest.raises(MaxAmountExceeded, match=r"0\.010001 USDC"):
        wallet.reserve_atomic("USDC", 10_001, 6, "0xPayTo")
    # A top-up is no request price: only the budget, assets and payees apply.
    wallet.reserve_atomic("USDC", 10_000, 6, "0xPayTo", per_request=False).commit()
    with pytest.raises(BudgetExceeded):
        wallet.reserve_atomic("USDC", 1, 6, "0xPayTo", per_request=False)
    assert wallet.spent("USDC") == "0.02"
    # The asset list may name the token's address instead, in any case.
    by_address = Wallet.generate(assets=[token.lower()], payees=["gw_x"])
    by_address.reserve_atomic("USDF", 1, 6, "0xPAYTO", aliases=[token], payee_aliases=["gw_x"])
    with pytest.raises(AssetNotAllowed):
        by_address.reserve_atomic("USDF", 1, 6, "gw_x")
    with pytest.raises(PayeeNotAllowed):
        by_address.reserve_atomic("USDF", 1, 6, "0xPayTo", aliases=[token])
    with pytest.raises(AmountError):
        wallet.reserve_atomic("USDC", -1, 6, "0xPayTo")


def test_a_refund_gives_a_committed_payment_back_once() -> None:
    wallet = Wallet.generate(budget="1")
    reservation = wallet.reserve("USDF", "0.6", "gw")
    reservation.refund()  # not committed yet: nothing to refund
    reservation.commit()
    reservation.refund()
    reservation.refund()
    assert (wallet.spent(), wallet.remaining()) == ("0", "1")


def test_keygen_evm_writes_a_private_key_and_prints_its_address(tmp_path: Path) -> None:
    x402 = str(Path(sys.executable).parent / "x402")
    out = tmp_path / "agent.evm"
    result = subprocess.run(
        [x402, "keygen", "--evm", "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    key = EvmKey.load(out)
    assert result.stdout.strip() == f"address: {key.address}"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert key.hex[2:] not in result.stdout + result.stderr
