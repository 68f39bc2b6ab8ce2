"""Coverage-guided fuzzing of the tick scanner with atheris (`make fuzz`, nightly).

Each input is split on byte 0x1e into up to 16 record values (an empty piece after
0x1e 0x1e is a record without a value), read as one micro-batch by the Numba scanner
and record by record by orjson and the validator (`stream.contracts.testing`). Any
disagreement raises, so libFuzzer stops and writes the input as `crash-*`. The
validator's Python is instrumented for coverage; the Numba-compiled scanner is not
(atheris sees no coverage inside it), so the seed corpus starts from real ticks.

Run: python -m bench.fuzz_scanner [-runs=200000] [-seed=1] [corpus dir ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

# the validator only: instrumented bytecode would not compile under Numba
SCANNER = ["stream.contracts.tickscan", "stream.contracts.tickcodec"]
with atheris.instrument_imports(include=["stream.contracts.tick"], exclude=SCANNER):
    from stream.contracts.testing import disagreement
    from stream.contracts.tick import Tick
    from stream.contracts.tickcodec import warm_up

NOW = 1_700_000_000_000_000_000
FUTURE_NS = 5_000_000_000
SEPARATOR = b"\x1e"


def one_input(data: bytes) -> None:
    """Raise AssertionError where the scanner and the per-record path disagree."""
    values: list[bytes | None] = [
        None if piece == SEPARATOR else piece for piece in data.split(SEPARATOR)[:16]
    ]
    found = disagreement(values, NOW, FUTURE_NS)
    if found is not None:
        raise AssertionError(found)


def seeds(where: Path) -> None:
    """A few valid ticks and near misses to start the corpus from."""
    ticks = [
        Tick("BTC/USDT", NOW - 1000, 60000.01, 0.5, "buy", "42", NOW),
        Tick("é/€", NOW, 1e-300, 0.0, "sell", "7", NOW),
        Tick("XRP/ETH", NOW - 10**9, 0.00141342, 123.456, "buy", "x" * 20, NOW),
    ]
    for i, tick in enumerate(ticks):
        raw = tick.encode()
        (where / f"tick-{i}").write_bytes(raw)
        (where / f"pair-{i}").write_bytes(raw + SEPARATOR + raw.replace(b":", b" : "))
    (where / "escaped").write_bytes(
        b'{"symbol":"\\u0041\\"","event_ns":1,"price":1E5,"quantity":-0.0,'
        b'"side":"sell","trade_id":"\\n","recv_ns":2}'
    )


# JSON and tick tokens for libFuzzer's mutations (-dict)
TOKENS = [
    b'"symbol"', b'"event_ns"', b'"price"', b'"quantity"', b'"side"', b'"trade_id"',
    b'"recv_ns"', b'"buy"', b'"sell"', b"\\u00", b'\\"', b"e-", b"E+", b"1e308", b"0.",
    b"-0", b"null", b"true", b"9223372036854775807", b"18446744073709551616", SEPARATOR,
]  # fmt: skip


def dictionary_line(token: bytes) -> str:
    r"""One libFuzzer dictionary entry: printable bytes as they are, others as \xHH.

    >>> dictionary_line(b'"a\\\x1e')
    '"\\x22a\\x5c\\x1e"'
    """
    inner = "".join(
        chr(c) if 0x20 <= c < 0x7F and c not in b'"\\' else f"\\x{c:02x}" for c in token
    )
    return f'"{inner}"'


def main() -> None:
    """Run libFuzzer over `one_input` (its flags and corpus dirs as arguments)."""
    warm_up()
    argv = list(sys.argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-scanner-") as tmp:
        if not any(a.startswith("-dict=") for a in argv[1:]):
            words = Path(tmp) / "tokens.dict"
            words.write_text("".join(dictionary_line(t) + "\n" for t in TOKENS))
            argv.append(f"-dict={words}")
        if not any(not a.startswith("-") for a in argv[1:]):
            corpus = Path(tmp) / "corpus"
            corpus.mkdir()
            seeds(corpus)
            argv.append(str(corpus))
        atheris.Setup(argv, one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
