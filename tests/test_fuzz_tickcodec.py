"""Fuzzing the tick decoder: the Numba scanner and the per-record path agree on every input.

`stream.contracts.testing.disagreement` (the scanner against `decode_tick`, orjson and
the validator one record at a time) over valid ticks written every way JSON allows,
near-valid ones (bytes cut, flipped, added) and arbitrary bytes. Derandomized, so every run tries
the same examples; `make fuzz` runs the scanner under atheris for longer.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.contracts.testing import disagreement, reference
from stream.contracts.tick import Tick
from stream.contracts.tickcodec import warm_up

NOW = 1_700_000_000_000_000_000
FUTURE_NS = 5_000_000_000
FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FIELDS = ("symbol", "event_ns", "price", "quantity", "side", "trade_id", "recv_ns")


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    warm_up()


def assert_agree(values: list[bytes | None]) -> None:
    found = disagreement(values, NOW, FUTURE_NS)
    assert found is None, found


def outcome(raw: bytes | None) -> str:
    one = reference([raw], NOW, FUTURE_NS)[0]
    return "accepted" if isinstance(one, Tick) else one[0]


# --- valid ticks, written every way JSON allows --------------------------------------------

WS = st.sampled_from(["", "", "", " ", "\n", "\t", "\r\n  "])
SYMBOL = st.one_of(
    st.sampled_from(["BTC/USDT", "XRP/ETH", "A", "é/€", 'we"ird', "back\\slash", "😀"]),
    st.text(min_size=0, max_size=70),
)
FLOAT = st.one_of(
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
    st.floats(min_value=1e-9, max_value=1e9),
    st.sampled_from([0.1, 0.3, 60000.01, 5e-324, 1.7976931348623157e308, 1e23, 2.0**53 + 2]),
)
NS = st.one_of(
    st.integers(NOW - 10**15, NOW + FUTURE_NS),
    st.integers(NOW + FUTURE_NS - 10, NOW + FUTURE_NS + 10),  # the future bound
    st.integers(-(2**63), 2**63 - 1),
)


@st.composite
def number_text(draw: Any, value: float) -> str:
    """`value` as JSON may write it: shortest repr, 17 digits, exponent, integer form."""
    forms = [repr(value), f"{value:.17g}", f"{value:e}", f"{value:E}"]
    if value.is_integer() and abs(value) < 1e30:
        forms.append(str(int(value)))
    text = draw(st.sampled_from(forms))
    return text.replace("inf", "1e999")


@st.composite
def string_text(draw: Any, value: str) -> str:
    """`value` as a JSON string, some characters written as \\u escapes."""
    plain = orjson.dumps(value).decode()[1:-1]
    if draw(st.booleans()):
        return plain
    return "".join(f"\\u{ord(c):04x}" if c.isalnum() and ord(c) < 0x10000 else c for c in plain)


@st.composite
def tick_record(draw: Any) -> bytes:
    """A tick object with fields in any order, any whitespace, any number form."""
    fields = {
        "symbol": '"' + draw(string_text(draw(SYMBOL))) + '"',
        "event_ns": str(draw(NS)),
        "price": draw(number_text(draw(FLOAT))),
        "quantity": draw(number_text(draw(FLOAT))),
        "side": '"'
        + draw(st.sampled_from(["buy", "sell", "buy", "sell", "hold", "BUY", ""]))
        + '"',
        "trade_id": draw(
            st.one_of(
                st.integers(0, 10**12).map(str),
                st.text(max_size=12).map(lambda t: orjson.dumps(t).decode()),
            )
        ),
        "recv_ns": str(draw(NS)),
    }
    names = draw(st.permutations(FIELDS))
    w = draw(WS)
    parts = [f'{w}"{name}"{draw(WS)}:{draw(WS)}{fields[name]}{draw(WS)}' for name in names]
    return ("{" + ",".join(parts) + "}" + draw(WS)).encode()


@st.composite
def near_valid(draw: Any) -> bytes:
    """A tick record with a few bytes cut, changed, repeated or added."""
    data = bytearray(draw(tick_record()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["cut", "flip", "insert", "repeat"]))
        if edit == "cut":
            del data[at : at + draw(st.integers(1, 6))]
        elif edit == "flip" and at < len(data):
            data[at] = draw(st.sampled_from(list(b'{}[]",:.-+eE0123456789 \\u\x00\xff')))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 12))]
    return bytes(data)


RECORD = st.one_of(
    tick_record(),
    near_valid(),
    st.binary(max_size=120),
    st.just(b""),
    st.none(),
)


@FUZZ
@given(st.lists(tick_record(), min_size=1, max_size=6))
def test_valid_ticks_agree(values: list[bytes]) -> None:
    assert_agree(list(values))


@FUZZ
@given(st.lists(near_valid(), min_size=1, max_size=6))
def test_near_valid_ticks_agree(values: list[bytes]) -> None:
    assert_agree(list(values))


@FUZZ
@given(st.lists(RECORD, min_size=1, max_size=8))
def test_any_bytes_agree(values: list[bytes | None]) -> None:
    assert_agree(values)


def test_the_strategies_reach_every_outcome() -> None:
    """The fuzz is not idle: its records are accepted, refused as JSON, refused by the contract."""
    seen: Counter[str] = Counter()

    @settings(FUZZ, max_examples=300)
    @given(tick_record(), near_valid())
    def draw(valid: bytes, edited: bytes) -> None:
        seen[f"valid {outcome(valid)}"] += 1
        seen[f"edited {outcome(edited)}"] += 1

    draw()
    for kind in (
        "valid accepted",
        "valid side",
        "valid schema",
        "valid future",
        "edited accepted",
        "edited decode",
    ):
        assert seen[kind] > 0, (kind, seen)
