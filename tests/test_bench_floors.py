"""The e2e echo floors on the real broker: every tick echoed once, in order, and committed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.settings import Settings
from stream.kafka.clients import ensure_topics
from tests.helpers import produce_records, read_topic, run, unique

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 2
PER_PARTITION = 40


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offsets, read without joining it (a join would rebalance it)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        await consumer.stop()


@pytest.mark.parametrize("floor", ["echo_aiokafka", "echo_confluent", "echo"])
def test_a_floor_echoes_every_tick_once_in_order(
    stack_settings: Settings, floor: str, tmp_path: Path
) -> None:
    bootstrap = stack_settings.bootstrap
    source, sink, group = unique("floor-in"), unique("floor-out"), unique("floor-g")
    run(ensure_topics(bootstrap, [source, sink], PARTITIONS))
    records = [(b"k%d" % p, b"p%d-%d" % (p, i), p) for i in range(PER_PARTITION) for p in (0, 1)]
    log = (tmp_path / "floor.log").open("w+")
    argv = [sys.executable, "-m", f"bench.{floor}", "--bootstrap", bootstrap, "--source", source,
            "--sink", sink, "--group", group]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120  # librdkafka joins a group in ~23 s here
        while "assigned" not in (tmp_path / "floor.log").read_text():
            assert proc.poll() is None, (tmp_path / "floor.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the floor was not assigned within 120 s"
            time.sleep(0.2)
        run(produce_records(bootstrap, source, records, None))
        echoed = run(read_topic(bootstrap, sink, PARTITIONS, len(records)))
        deadline = time.monotonic() + 30
        while (committed := run(_committed(bootstrap, group, source))) != {
            p: PER_PARTITION for p in range(PARTITIONS)
        }:
            assert time.monotonic() < deadline, committed
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert len(echoed) == len(records)
    for p in range(PARTITIONS):
        got = [(r.key, r.value) for r in echoed if r.partition == p]
        assert got == [(k, v) for k, v, q in records if q == p]
