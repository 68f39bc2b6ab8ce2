"""Live ingestion against local websocket servers speaking Binance, Coinbase and Kraken formats.

Each server replays a scripted stream built from the exchange's documented messages
(tests/data/ingest/): trades of two symbols, a dropped connection mid-stream (the
next connection repeats the last trades before it), a jump in trade ids and two
malformed messages. The ticks are published to the real local broker and read back.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from websockets.asyncio.server import ServerConnection, serve

from deploy.settings import Settings
from stream.contracts.tick import decode_tick
from stream.ingest import ccxt_adapter
from stream.ingest.ccxt_adapter import WS_URL_PATHS, GuardedClient, open_exchange, spot_market
from stream.ingest.live import IngestConfig, LiveIngest, TradeIds, parse_symbols
from stream.kafka.clients import ensure_topics
from tests.helpers import read_topic, run, tickserve
from tickserve.errors import ConfigError

DATA = Path(__file__).resolve().parent / "data" / "ingest"
SYMBOLS = ("BTC/USDT", "ETH/USDT")
OVERLAP = 3  # trades the server repeats on the connection after a drop


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


@dataclass(frozen=True)
class Dialect:
    """How one exchange subscribes and sends trades (messages from its docs, fields replaced)."""

    name: str
    path: str  # of the websocket URL (ccxt tells Binance spot by '/stream', Kraken v2 by 'v2')
    market_id: Callable[[str], str]
    subscribed: Callable[[dict[str, Any]], list[str]]  # subscribe request -> market ids
    trade: Callable[[dict[str, Any], str, int, float, float, bool, int], dict[str, Any]]

    def template(self) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads((DATA / f"{self.name}.json").read_bytes())
        return doc


def _binance_trade(t: dict[str, Any], mid: str, tid: int, px: float, qty: float, buy: bool,
                   ms: int) -> dict[str, Any]:  # fmt: skip
    msg = copy.deepcopy(t)
    msg.update(s=mid, t=tid, p=f"{px:.2f}", q=f"{qty:.4f}", T=ms, E=ms, m=not buy)
    return msg


def _coinbase_trade(t: dict[str, Any], mid: str, tid: int, px: float, qty: float, buy: bool,
                    ms: int) -> dict[str, Any]:  # fmt: skip
    msg = copy.deepcopy(t)
    trade = msg["events"][0]["trades"][0]
    trade.update(trade_id=str(tid), product_id=mid, price=f"{px:.2f}", size=f"{qty:.4f}",
                 side="BUY" if buy else "SELL", time=_iso(ms))  # fmt: skip
    msg["timestamp"] = _iso(ms)
    return msg


def _kraken_trade(t: dict[str, Any], mid: str, tid: int, px: float, qty: float, buy: bool,
                  ms: int) -> dict[str, Any]:  # fmt: skip
    msg = copy.deepcopy(t)
    msg["data"][0].update(symbol=mid, trade_id=tid, price=px, qty=qty,
                          side="buy" if buy else "sell", timestamp=_iso(ms))  # fmt: skip
    return msg


DIALECTS = {
    "binance": Dialect(
        "binance",
        "/stream/ws",
        lambda s: s.replace("/", ""),
        lambda req: [p.split("@")[0].upper() for p in req.get("params", [])],
        _binance_trade,
    ),
    "coinbase": Dialect(
        "coinbase",
        "/",
        lambda s: s.replace("/", "-"),
        lambda req: list(req.get("product_ids", [])) if req.get("type") == "subscribe" else [],
        _coinbase_trade,
    ),
    "kraken": Dialect(
        "kraken",
        "/v2",
        lambda s: s,
        lambda req: list(req.get("params", {}).get("symbol", [])),
        _kraken_trade,
    ),
}


def _script(symbol: str) -> list[tuple[str, Any]]:
    """BTC: 20 trades, a drop after 12, then ids jump by 5; ETH: 20 trades and 2 bad messages."""
    if symbol == "BTC/USDT":
        ids = [*range(1001, 1021), *range(1026, 1031)]
        entries: list[tuple[str, Any]] = [("trade", i) for i in ids]
        entries.insert(12, ("drop", None))
        return entries
    entries = [("trade", i) for i in range(2001, 2021)]
    entries.insert(6, ("raw", '{"broken json'))
    entries.insert(14, ("bad", 2999))  # no price (NaN, or null in JSON)
    return entries


EXPECTED = {"BTC/USDT": [*range(1001, 1021), *range(1026, 1031)], "ETH/USDT": [*range(2001, 2021)]}


@dataclass
class ExchangeServer:
    """A local websocket server replaying each symbol's script in one exchange's format."""

    dialect: Dialect
    sent: dict[str, int] = field(default_factory=dict)
    dropped: bool = False
    connections: int = 0

    async def handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        template = self.dialect.template()
        halt = asyncio.Event()
        senders: list[asyncio.Task[None]] = []
        by_id = {self.dialect.market_id(s): s for s in SYMBOLS}
        try:
            async for raw in ws:
                request = orjson.loads(raw)
                if request.get("method") == "ping":  # Kraken v2's keepalive
                    now = _iso(time.time_ns() // 1_000_000)
                    pong = {"method": "pong", "req_id": request.get("req_id"), "time_in": now,
                            "time_out": now}  # fmt: skip
                    await ws.send(orjson.dumps(pong).decode())
                    continue
                ack = copy.deepcopy(template["ack"])
                if "id" in ack:
                    ack["id"] = request.get("id")
                await ws.send(orjson.dumps(ack).decode())
                for mid in self.dialect.subscribed(request):
                    symbol = by_id[mid]
                    senders.append(asyncio.create_task(self._send(ws, template, symbol, halt)))
        except Exception:  # the connection went away
            pass
        finally:
            halt.set()
            for task in senders:
                task.cancel()

    async def _send(
        self, ws: ServerConnection, template: dict[str, Any], symbol: str, halt: asyncio.Event
    ) -> None:
        script = _script(symbol)
        done = self.sent.get(symbol, 0)
        mid = self.dialect.market_id(symbol)
        price = 30_000.0 if symbol.startswith("BTC") else 2_000.0
        for i in range(max(0, done - OVERLAP), len(script)):
            if halt.is_set():
                return
            kind, value = script[i]
            replay = i < done
            if replay and kind != "trade":
                continue
            if kind == "drop":
                if self.dropped:
                    continue
                self.dropped = True
                self.sent[symbol] = i  # the next connection repeats the OVERLAP trades before
                halt.set()
                await asyncio.sleep(0.05)  # let what was sent reach the client
                ws.transport.abort()  # no close frame: a dropped connection
                return
            if kind == "raw":
                text = value
            else:
                ms = time.time_ns() // 1_000_000 - 3
                px = price + value % 7 if kind == "trade" else math.nan  # "bad": no price
                msg = self.dialect.trade(template["trade"], mid, value, px, 0.5 + value % 3,
                                         value % 2 == 0, ms)  # fmt: skip
                text = orjson.dumps(msg).decode()
            await ws.send(text)
            self.sent[symbol] = max(self.sent.get(symbol, 0), i + 1)
            await asyncio.sleep(0.002)


def _markets(dialect: Dialect) -> list[dict[str, Any]]:
    return [spot_market(s, dialect.market_id(s)) for s in SYMBOLS]


async def _ingest(dialect: Dialect, settings: Settings) -> tuple[LiveIngest, ExchangeServer]:
    server = ExchangeServer(dialect)
    await ensure_topics(settings.bootstrap, [settings.ticks_topic], settings.partitions)
    async with serve(server.handle, "127.0.0.1", 0) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        config = IngestConfig(
            dialect.name,
            SYMBOLS,
            settings.bootstrap,
            settings.ticks_topic,
            backoff_min_s=0.05,
            url=f"ws://127.0.0.1:{port}{dialect.path}",
            markets=_markets(dialect),
        )
        stop = asyncio.Event()
        ingest = LiveIngest(config, stop)
        task = asyncio.create_task(ingest.run())
        expected = sum(len(ids) for ids in EXPECTED.values())
        deadline = time.monotonic() + 30
        while ingest.counts.queued < expected and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything more (a duplicate let through) would arrive now
        stop.set()
        await task
    return ingest, server


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.services
@pytest.mark.parametrize("exchange", ["binance", "coinbase", "kraken"])
def test_live_trades_reach_the_ticks_topic_once_each(topics: Settings, exchange: str) -> None:
    dialect = DIALECTS[exchange]
    before = {
        name: _sample(name, {"exchange": exchange})
        for name in ("ingest_reconnects_total", "ingest_malformed_total")
    }
    gaps_before = _sample("ingest_gaps_total", {"exchange": exchange, "symbol": "BTC/USDT"})
    ingest, server = run(_ingest(dialect, topics))  # type: ignore[misc]
    counts = ingest.counts

    expected = sum(len(ids) for ids in EXPECTED.values())
    assert server.dropped and server.connections >= 2
    assert counts.reconnects == 1
    assert counts.malformed == 2
    assert (counts.gaps, counts.missed) == (1, 5)
    assert counts.duplicates >= OVERLAP  # BTC's last trades before the drop, sent again
    assert counts.queued == counts.published == expected

    records = run(read_topic(topics.bootstrap, topics.ticks_topic, topics.partitions, expected))
    assert len(records) == expected  # type: ignore[arg-type]
    now = time.time_ns()
    ticks = [decode_tick(r.value, now, 0) for r in records]  # type: ignore[attr-defined]
    for record, tick in zip(records, ticks, strict=True):  # type: ignore[call-overload]
        assert record.key == tick.symbol.encode()
        assert tick.event_ns <= tick.recv_ns <= now  # exchange time, then our receive time
        assert tick.recv_ns - tick.event_ns < 5_000_000_000
    for symbol, ids in EXPECTED.items():
        got = [int(t.trade_id) for t in ticks if t.symbol == symbol]
        assert got == ids, symbol  # each once, in order (one key, one partition)
    btc = next(t for t in ticks if t.trade_id == "1002")
    assert (btc.price, btc.quantity, btc.side) == (30_000.0 + 1002 % 7, 0.5 + 1002 % 3, "buy")

    assert (
        _sample("ingest_reconnects_total", {"exchange": exchange})
        - before["ingest_reconnects_total"]
        == 1
    )
    assert (
        _sample("ingest_malformed_total", {"exchange": exchange}) - before["ingest_malformed_total"]
        == 2
    )
    gaps = _sample("ingest_gaps_total", {"exchange": exchange, "symbol": "BTC/USDT"})
    assert gaps - gaps_before == 1
    assert _sample("ingest_ticks_total", {"exchange": exchange, "symbol": "ETH/USDT"}) >= 20
    assert _sample("ingest_lag_seconds_count", {"exchange": exchange}) >= expected


@pytest.mark.services
def test_a_full_queue_blocks_the_reader_and_loses_nothing(topics: Settings) -> None:
    """Queue of 1: the readers wait for the publisher (counted); every trade still arrives once."""
    dialect = DIALECTS["kraken"]

    async def main() -> LiveIngest:
        server = ExchangeServer(dialect)
        await ensure_topics(topics.bootstrap, [topics.ticks_topic], topics.partitions)
        async with serve(server.handle, "127.0.0.1", 0) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/v2"
            config = IngestConfig("kraken", SYMBOLS, topics.bootstrap, topics.ticks_topic,
                                  queue_size=1, backoff_min_s=0.05, url=url,
                                  markets=_markets(dialect))  # fmt: skip
            stop = asyncio.Event()
            ingest = LiveIngest(config, stop)
            task = asyncio.create_task(ingest.run())
            deadline = time.monotonic() + 30
            while ingest.counts.queued < 45 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stop.set()
            await task
            return ingest

    ingest = run(main())
    counts = ingest.counts  # type: ignore[attr-defined]
    assert counts.queue_full > 0
    assert counts.published == counts.queued == 45
    assert (counts.malformed, counts.gaps, counts.reconnects) == (2, 1, 1)
    records = run(read_topic(topics.bootstrap, topics.ticks_topic, topics.partitions, 45))
    ids = sorted(orjson.loads(r.value)["trade_id"] for r in records)  # type: ignore[attr-defined]
    assert ids == sorted(str(i) for ids in EXPECTED.values() for i in ids)


def test_trade_ids_tell_repeats_and_gaps() -> None:
    ids = TradeIds()
    assert [ids.check("A", str(i)) for i in (1, 2, 2, 5, 3, 6)] == [0, 0, None, 2, None, 0]
    assert ids.check("B", "1") == 0  # per symbol
    assert ids.check("A", "abc") == 0  # not a number: passed through


def test_bad_configuration_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {"TICKSERVE_STATE_DIR": str(tmp_path)}
    done = tickserve("ingest", "--exchange", "nasdaq", "--symbols", "BTC/USDT", env=env,
                     cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert "tickserve ingest: error: unknown exchange 'nasdaq'" in done.stderr
    assert parse_symbols("BTC/USDT, ETH/USDT") == ("BTC/USDT", "ETH/USDT")
    for bad in (" , ", "BTCUSDT", "BTC/"):
        with pytest.raises(ConfigError, match="--symbols takes BASE/QUOTE pairs"):
            parse_symbols(bad)


def test_ccxt_internals_the_adapter_relies_on() -> None:
    """Breaks on the ccxt upgrade that moves what stream/ingest/ccxt_adapter.py reaches into."""
    import ccxt.pro
    from ccxt.async_support.base.exchange import Exchange
    from ccxt.async_support.base.ws.client import Client

    for name, path in WS_URL_PATHS.items():
        node: Any = getattr(ccxt.pro, name)().urls["api"]
        for key in path:
            node = node[key]
        assert isinstance(node, str) and node.startswith("wss://"), name
    assert list(inspect.signature(Client.handle_message).parameters) == ["self", "message"]
    assert list(inspect.signature(Exchange.client).parameters) == ["self", "url"]
    assert list(inspect.signature(Exchange.on_connected).parameters)[:2] == ["self", "client"]
    assert list(inspect.signature(Exchange.handle_message).parameters) == [
        "self",
        "client",
        "message",
    ]

    async def guarded() -> None:
        exchange = open_exchange("kraken", lambda d: None, lambda: None, "ws://127.0.0.1:1/v2")
        assert ccxt_adapter.ws_url(exchange) == "ws://127.0.0.1:1/v2"
        assert isinstance(exchange.client("ws://127.0.0.1:1/v2"), GuardedClient)
        assert ccxt_adapter.cached_trades(exchange, "BTC/USDT") == []
        await exchange.close()

    run(guarded())
