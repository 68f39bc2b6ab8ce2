"""SASL for our own broker connections: PLAIN and SCRAM-SHA-256/512 (RFC 4616, 5802, 7677).

`authenticate` runs the exchange on a freshly opened `stream.kafka.wire.Connection`:
SaslHandshake v1 names the mechanism, then SaslAuthenticate v1 carries the
mechanism's messages (KIP-152), before the connection carries anything else.
`ScramClient` is the client side of SCRAM on its own, held against the RFC 7677
example in tests/test_security.py.

Usernames are sent as given (no SASLprep, RFC 4013): ASCII names and passwords
behave as with the Java client; others may not.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tickserve.errors import BrokerAuthError

if TYPE_CHECKING:
    from stream.kafka.security import KafkaSecurity
    from stream.kafka.wire import Connection

SASL_HANDSHAKE, SASL_AUTHENTICATE = 17, 36  # api keys
HANDSHAKE_VERSION, AUTHENTICATE_VERSION = 1, 1
HASHES: dict[str, Callable[..., Any]] = {
    "SCRAM-SHA-256": hashlib.sha256,
    "SCRAM-SHA-512": hashlib.sha512,
}

_I16, _I32 = struct.Struct(">h"), struct.Struct(">i")


def plain_message(username: str, password: str) -> bytes:
    """The PLAIN mechanism's one message (RFC 4616): no authzid, user, password."""
    return b"\0" + username.encode() + b"\0" + password.encode()


def _attributes(message: bytes) -> dict[str, str]:
    """`a=x,b=y` as a dict (values may hold '=', never ',')."""
    out = {}
    for pair in message.decode().split(","):
        name, _, value = pair.partition("=")
        out[name] = value
    return out


class ScramClient:
    """One SCRAM exchange, client side: `first`, then `final`, then `verify`.

    Args:
        mechanism: `SCRAM-SHA-256` or `SCRAM-SHA-512`.
        username: Sent as `n=` with ',' and '=' escaped (RFC 5802 5.1).
        password: Only its salted hash leaves this object (as a proof).
        nonce: The client nonce; random unless a test fixes it.
    """

    def __init__(self, mechanism: str, username: str, password: str, nonce: str = "") -> None:
        """Prepare the exchange (no I/O)."""
        self._hash = HASHES[mechanism]
        self._password = password.encode()
        self._nonce = nonce or secrets.token_urlsafe(24)
        name = username.replace("=", "=3D").replace(",", "=2C")
        self._first_bare = f"n={name},r={self._nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        """The client-first message (no channel binding: `n,,`)."""
        return f"n,,{self._first_bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        """The client-final message, with the proof, for the server-first message.

        Raises:
            BrokerAuthError: The server's nonce does not extend ours, or its message
                lacks the salt or iteration count.
        """
        attrs = _attributes(server_first)
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s"), attrs.get("i", "")
        if "e" in attrs:
            raise BrokerAuthError(f"the broker refused SCRAM: {attrs['e']}")
        if not nonce.startswith(self._nonce) or salt is None or not iterations.isdigit():
            raise BrokerAuthError("the broker's SCRAM server-first message is malformed")
        final_bare = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{server_first.decode()},{final_bare}".encode()
        name = self._hash().name
        salted = hashlib.pbkdf2_hmac(name, self._password, base64.b64decode(salt), int(iterations))
        client_key = hmac.new(salted, b"Client Key", self._hash).digest()
        stored_key = self._hash(client_key).digest()
        signature = hmac.new(stored_key, auth_message, self._hash).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", self._hash).digest()
        self._server_signature = hmac.new(server_key, auth_message, self._hash).digest()
        return f"{final_bare},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        """Check the server's signature: it, too, knows the password.

        Raises:
            BrokerAuthError: The server reported an error (`e=`) or signed wrongly.
        """
        attrs = _attributes(server_final)
        if "e" in attrs:
            raise BrokerAuthError(f"the broker refused SCRAM: {attrs['e']}")
        signature = base64.b64decode(attrs.get("v", ""))
        if not self._server_signature or not hmac.compare_digest(signature, self._server_signature):
            raise BrokerAuthError("the broker's SCRAM signature is wrong (not the real broker?)")


def _bytes(data: bytes) -> bytes:
    return _I32.pack(len(data)) + data


def _string(text: str) -> bytes:
    raw = text.encode()
    return _I16.pack(len(raw)) + raw


def _read_string(body: bytes, pos: int) -> tuple[str | None, int]:
    (size,) = _I16.unpack_from(body, pos)
    if size < 0:
        return None, pos + 2
    return body[pos + 2 : pos + 2 + size].decode(), pos + 2 + size


async def _handshake(conn: Connection, mechanism: str) -> None:
    body = await conn.request(SASL_HANDSHAKE, HANDSHAKE_VERSION, [_string(mechanism)])
    (error,) = _I16.unpack_from(body, 0)
    (count,) = _I32.unpack_from(body, 2)
    enabled, pos = [], 6
    for _ in range(max(count, 0)):
        name, pos = _read_string(body, pos)
        enabled.append(name or "")
    if error or mechanism not in enabled:
        raise BrokerAuthError(
            f"the broker at {conn.address} does not enable SASL {mechanism} "
            f"(it enables {', '.join(enabled) or 'none'}): set TICKSERVE_KAFKA_SASL_MECHANISM"
        )


async def _authenticate(conn: Connection, message: bytes) -> bytes:
    """One SaslAuthenticate round trip: the server's answer, or BrokerAuthError."""
    body = await conn.request(SASL_AUTHENTICATE, AUTHENTICATE_VERSION, [_bytes(message)])
    (error,) = _I16.unpack_from(body, 0)
    reason, pos = _read_string(body, 2)
    if error:
        raise BrokerAuthError(
            f"the broker at {conn.address} refused the SASL login (error {error}: "
            f"{reason or 'authentication failed'})"
        )
    (size,) = _I32.unpack_from(body, pos)
    return body[pos + 4 : pos + 4 + max(size, 0)]


async def authenticate(conn: Connection, security: KafkaSecurity) -> None:
    """Log `conn` in with the mechanism of `security` (its protocol is a SASL one).

    Raises:
        BrokerAuthError: The broker does not enable the mechanism or refuses the login.
    """
    mechanism = security.sasl_mechanism
    await _handshake(conn, mechanism)
    password = security.password.get_secret_value() if security.password else ""
    if mechanism == "PLAIN":
        await _authenticate(conn, plain_message(security.username, password))
        return
    scram = ScramClient(mechanism, security.username, password)
    server_first = await _authenticate(conn, scram.first())
    server_final = await _authenticate(conn, scram.final(server_first))
    scram.verify(server_final)
