"""Money parsing: exact, strict, never rounded, never a float."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.errors import AmountError
from sidecar.core.money import Asset, to_atomic, to_decimal

USDF = Asset("USDF", 6)


@pytest.mark.parametrize(
    ("text", "atomic"),
    [
        ("0.25", 250_000),
        ("0.000001", 1),
        ("1", 1_000_000),
        ("0", 0),
        ("10.5", 10_500_000),
        ("0.250000", 250_000),
        ("123456789.123456", 123_456_789_123_456),
    ],
)
def test_parses_decimal_strings(text: str, atomic: int) -> None:
    assert USDF.to_atomic(text) == atomic


@pytest.mark.parametrize(
    "text",
    [
        "-1",
        "0.0000001",
        "1e3",
        "0.1.2",
        "",
        " 1",
        "1 ",
        ".5",
        "5.",
        "+1",
        "01",
        "0x10",
        "½",
        "\u0661",  # an Arabic-Indic digit
        "NaN",
        "inf",
        "1_000",
        "9" * 40,
    ],
)
def test_rejects_what_is_not_an_exact_amount(text: str) -> None:
    with pytest.raises(AmountError):
        USDF.to_atomic(text)


def test_rejects_floats_and_other_types() -> None:
    with pytest.raises(AmountError):
        to_atomic(0.25, 6)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("atomic", "text"),
    [
        (250_000, "0.25"),
        (1, "0.000001"),
        (1_000_000, "1"),
        (0, "0"),
        (-5, "-0.000005"),
    ],
)
def test_formats_the_shortest_exact_decimal(atomic: int, text: str) -> None:
    assert USDF.to_decimal(atomic) == text


def test_zero_decimal_asset() -> None:
    assert to_atomic("42", 0) == 42 and to_decimal(42, 0) == "42"
    with pytest.raises(AmountError):
        to_atomic("4.2", 0)


@given(st.integers(min_value=0, max_value=10**30), st.integers(min_value=0, max_value=18))
def test_atomic_round_trips_through_decimal(atomic: int, decimals: int) -> None:
    assert to_atomic(to_decimal(atomic, decimals), decimals) == atomic


@given(st.from_regex(r"(0|[1-9][0-9]{0,15})(\.[0-9]{1,6})?", fullmatch=True))
def test_decimal_round_trips_to_its_canonical_form(text: str) -> None:
    canonical = to_decimal(to_atomic(text, 6), 6)
    assert to_atomic(canonical, 6) == to_atomic(text, 6)
    assert "." not in canonical or not canonical.endswith("0")


@given(st.text(max_size=20))
def test_arbitrary_text_parses_or_raises_amount_error(text: str) -> None:
    with contextlib.suppress(AmountError):
        assert to_atomic(text, 6) >= 0
