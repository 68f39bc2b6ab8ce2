"""The one module that knows ccxt's insides: where its websocket addresses live, and its client.

ccxt.pro (part of ccxt since 4.x) gives `watch_trades` over each exchange's own
websocket protocol. Three things it has no public hook for, used here only:

1. The websocket address of each exchange sits in `urls['api']['ws']`, under a key
   of that exchange's own (`WS_URL_PATHS`); `set_ws_url` overrides it (a local test
   server, a proxy, a testnet).
2. A message its code cannot read (bad JSON, or an exchange handler raising on odd
   content) escapes the callback of ccxt's receive loop, which then stops reading
   that connection for good. `GuardedClient` (a subclass of ccxt's `Client`, swapped
   in by `client()`) counts such a message through `on_malformed` and goes on.
3. Connections: `on_connected` tells each (re)connection apart per URL, so a
   reconnect is counted once per connection, not once per symbol watching it.
4. `watch_trades` hands over the trades that arrived since its previous call only
   when the next message for that symbol arrives: trades that came in while the
   reader waited on a full queue would sit in ccxt's cache (`exchange.trades`, at
   most `tradesLimit` per symbol) until the symbol trades again. `cached_trades`
   reads that cache so the reader can take them at once.

`tests/test_ingest_live.py::test_ccxt_internals_the_adapter_relies_on` breaks when
an upgrade moves any of these.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import ccxt.pro
from ccxt.async_support.base.ws.client import Client

from tickserve.errors import ConfigError

logger = logging.getLogger(__name__)

# exchange id -> keys under urls['api'] to its public websocket address
WS_URL_PATHS: dict[str, tuple[str, ...]] = {
    "binance": ("ws", "spot"),
    "coinbase": ("ws",),
    "kraken": ("ws", "publicV2"),
}
EXCHANGES = tuple(WS_URL_PATHS)


class GuardedClient(Client):  # type: ignore[misc]
    """ccxt's websocket client, where a message that fails to parse is counted and skipped."""

    on_malformed: Callable[[str], None] = staticmethod(lambda detail: None)

    def handle_message(self, message: Any) -> None:
        """Hand one frame to ccxt; anything it raises is a malformed message, not a dead loop."""
        try:
            super().handle_message(message)
        except Exception as exc:  # any error in ccxt's parsing or the exchange's handler
            self.on_malformed(f"{type(exc).__name__}: {exc}")


def ws_url(exchange: Any) -> str:
    """The public websocket address `exchange` dials for trades."""
    node = exchange.urls["api"]
    for key in WS_URL_PATHS[exchange.id]:
        node = node[key]
    return str(node)


def set_ws_url(exchange: Any, url: str) -> None:
    """Dial `url` instead of the exchange's public websocket address."""
    *parents, last = WS_URL_PATHS[exchange.id]
    node = exchange.urls["api"]
    for key in parents:
        node = node[key]
    node[last] = url


def cached_trades(exchange: Any, symbol: str) -> list[dict[str, Any]]:
    """The trades ccxt holds for `symbol` now, oldest first (its cache; a copy)."""
    trades = getattr(exchange, "trades", None) or {}
    return list(trades.get(symbol) or [])


def spot_market(symbol: str, market_id: str) -> dict[str, Any]:
    """A spot market as ccxt's `set_markets` takes it (for use without the exchange's REST API)."""
    base, quote = symbol.split("/")
    return {
        "id": market_id,
        "lowercaseId": market_id.lower(),
        "symbol": symbol,
        "base": base,
        "quote": quote,
        "baseId": base,
        "quoteId": quote,
        "type": "spot",
        "spot": True,
        "margin": False,
        "swap": False,
        "future": False,
        "option": False,
        "contract": False,
        "active": True,
    }


class ConnectionCounts:
    """Connections opened per websocket URL: every one after the first is a reconnect."""

    def __init__(self, on_reconnect: Callable[[], None]) -> None:
        """Call `on_reconnect` for every connection after a URL's first."""
        self.opened: Counter[str] = Counter()
        self.on_reconnect = on_reconnect

    def connected(self, url: str) -> None:
        """A connection to `url` is open."""
        self.opened[url] += 1
        if self.opened[url] > 1:
            self.on_reconnect()


def open_exchange(
    name: str,
    on_malformed: Callable[[str], None],
    on_reconnect: Callable[[], None],
    url: str | None = None,
    markets: list[dict[str, Any]] | None = None,
) -> Any:
    """A ccxt.pro exchange whose bad messages are counted and whose reconnects are seen.

    Args:
        name: One of EXCHANGES.
        on_malformed: Called with a reason for every message ccxt could not read.
        on_reconnect: Called for every connection after the first one to a URL.
        url: Websocket address to dial instead of the exchange's own.
        markets: Markets to use instead of loading them from the exchange's REST API.

    Raises:
        ConfigError: `name` is not a supported exchange.
    """
    if name not in WS_URL_PATHS:
        raise ConfigError(f"unknown exchange {name!r}: one of {', '.join(EXCHANGES)}")
    base = getattr(ccxt.pro, name)
    counts = ConnectionCounts(on_reconnect)

    class Guarded(base):  # type: ignore[misc, valid-type]
        def client(self, url: str) -> Any:
            client = super().client(url)
            if type(client) is Client:
                client.__class__ = GuardedClient
                client.on_malformed = on_malformed
            return client

        def handle_message(self, client: Any, message: Any) -> None:
            if not isinstance(message, (dict, list)):  # text that is not JSON at all
                on_malformed(f"not a JSON message: {str(message)[:80]!r}")
                return
            super().handle_message(client, message)

        def on_connected(self, client: Any, message: Any = None) -> None:
            super().on_connected(client, message)
            counts.connected(client.url)

    exchange = Guarded({"enableRateLimit": True, "newUpdates": True})
    if url is not None:
        set_ws_url(exchange, url)
    if markets is not None:
        # every key ccxt's parsers read, as `load_markets` would give them
        exchange.set_markets([exchange.safe_market_structure(m) for m in markets])
    return exchange
