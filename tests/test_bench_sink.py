"""The benchmark sink's field scan: what it reads is what each record carried."""

from __future__ import annotations

import numpy as np
import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from bench.sink import STAGE_BYTES, fields
from stream.contracts.signal import STAGES
from stream.kafka.recordbatch import batch_bounds, parse_batches


def test_sink_reads_trade_id_recv_ns_and_header_t() -> None:
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    expected = []
    for i in range(50):
        trade_id, recv_ns = 10**12 + 7 * i, 1_700_000_000_000_000_000 + i
        tick = {"symbol": "A/B", "trade_id": str(trade_id), "event_ns": 5, "recv_ns": recv_ns}
        if i % 3 == 0:  # a signal's value holds the trade id quoted, as ticks do
            tick["trade_id"] = trade_id  # and a bare number is read the same
        stamps = STAGES.pack(i, i + 1, i + 2, i + 3, i + 4)
        headers = [] if i % 5 == 0 else [("x", b"yy"), ("t", stamps)] if i % 2 else [("t", stamps)]
        builder.append(i, timestamp=None, key=b"k", value=orjson.dumps(tick), headers=headers)
        expected.append((trade_id, recv_ns, bool(headers), i))
    buf = np.frombuffer(bytes(builder.build()), np.uint8)
    starts, ends, _ = batch_bounds(buf)
    _, _, _, value_start, value_len, _, _, status = parse_batches(buf, starts, ends, 0, True)
    assert status == 0
    n = len(value_start)
    tid, recv = np.empty(n, np.int64), np.empty(n, np.int64)
    raw, has = np.empty((n, STAGE_BYTES), np.uint8), np.empty(n, np.bool_)
    fields(buf, value_start, value_len, tid, recv, raw, has)
    assert tid.tolist() == [e[0] for e in expected]
    assert recv.tolist() == [e[1] for e in expected]
    assert has.tolist() == [e[2] for e in expected]
    got = raw[has].view("<i8")
    assert got[:, 0].tolist() == [e[3] for e in expected if e[2]]
    assert got[:, 4].tolist() == [e[3] + 4 for e in expected if e[2]]
