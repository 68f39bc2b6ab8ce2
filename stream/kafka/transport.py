"""Opening broker connections: TCP, then TLS and a SASL login as `KafkaSecurity` says.

The wire data path's connections are opened here (`open_connection`), and so is the
one-off probe (`diagnose`) that says why aiokafka could not bootstrap: aiokafka logs
the reason (a certificate, a refused login) and raises only "Unable to bootstrap".
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from aiokafka.errors import KafkaConnectionError, KafkaError

from stream.kafka import sasl
from stream.kafka.security import KafkaSecurity
from tickserve.errors import BrokerAuthError

if TYPE_CHECKING:
    from stream.kafka.wire import Connection

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # TCP and TLS handshake
LOGIN_TIMEOUT_S = 10.0  # the SASL exchange
ALERT_WAIT_S = 0.3  # `diagnose`: time for a TLS alert after the handshake (a slow path)
API_VERSIONS = 18  # api key: the probe's first request, as every client's

C = TypeVar("C", bound="Connection")


def _tls_error(host: str, port: int, exc: ssl.SSLError) -> BrokerAuthError:
    """One line saying which TLS check failed, and which setting governs it."""
    reason = exc.reason or str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {exc.verify_message}"
    hint = {
        "CERTIFICATE_VERIFY_FAILED": "is TICKSERVE_KAFKA_SSL_CA_FILE the CA that signed it?",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the broker wants a client certificate: set "
        "TICKSERVE_KAFKA_SSL_CERT_FILE and TICKSERVE_KAFKA_SSL_KEY_FILE",
        "SSLV3_ALERT_HANDSHAKE_FAILURE": "the broker may want a client certificate "
        "(TICKSERVE_KAFKA_SSL_CERT_FILE)",
        "WRONG_VERSION_NUMBER": "is this a TLS port? (TICKSERVE_KAFKA_SECURITY_PROTOCOL)",
    }.get(exc.reason or "", "")
    if "hostname" in str(reason).lower() or "IP address mismatch" in str(reason):
        hint = "the certificate does not name this host (TICKSERVE_KAFKA_SSL_CHECK_HOSTNAME)"
    text = f"TLS with the broker at {host}:{port} failed: {reason}"
    return BrokerAuthError(f"{text}; {hint}" if hint else text)


async def open_connection(
    factory: Callable[[str], C], host: str, port: int, security: KafkaSecurity
) -> C:
    """A connection to `host:port`, its TLS handshake done and its SASL login accepted.

    Raises:
        KafkaConnectionError: Nothing answered, or it did not answer in time (retriable).
        BrokerAuthError: The certificate, the handshake or the login was refused.
    """
    loop = asyncio.get_running_loop()
    context = security.ssl_context()
    address = f"{host}:{port}"
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, conn = await loop.create_connection(
                lambda: factory(address),
                host,
                port,
                ssl=context,
                server_hostname=host if context is not None else None,
            )
    except ssl.SSLError as exc:  # before OSError: it is one
        raise _tls_error(host, port, exc) from None
    except (OSError, TimeoutError) as exc:
        raise KafkaConnectionError(f"cannot connect to {address}: {exc!r}") from exc
    if not security.sasl:
        return conn
    try:
        async with asyncio.timeout(LOGIN_TIMEOUT_S):
            await sasl.authenticate(conn, security)
    except TimeoutError:
        await conn.close()
        msg = f"no answer to the SASL login from {address} within {LOGIN_TIMEOUT_S:.0f} s"
        raise KafkaConnectionError(msg) from None
    except BaseException:
        await conn.close()
        raise
    return conn


async def diagnose(bootstrap: str, security: KafkaSecurity) -> None:
    """Connect to the first bootstrap server once, as aiokafka would; raise why it fails.

    Returns quietly when the connection, login and one ApiVersions round trip work
    (the cause lies elsewhere) or when nothing answers at all.

    Raises:
        BrokerAuthError: The TLS handshake or the SASL login was refused.
    """
    from stream.kafka.wire import Connection

    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    lost: list[BaseException | None] = []

    class Probe(Connection):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)
            super().connection_lost(exc)

    try:
        conn = await open_connection(Probe, host.strip("[]"), int(port), security)
    except KafkaConnectionError:
        return
    answered = False
    try:
        # TLS 1.3: a server that wants a client certificate says so after the
        # handshake, with an alert, and closes. A request written after that close
        # draws a reset, which can discard the unread alert: listen first.
        if security.tls:
            await asyncio.sleep(ALERT_WAIT_S)
        if not lost:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await conn.request(API_VERSIONS, 0, [])
            answered = True
    except (KafkaError, TimeoutError):
        pass
    finally:
        await conn.close()
    cause = next((exc for exc in lost if isinstance(exc, ssl.SSLError)), None)
    if cause is not None and not answered:
        raise _tls_error(host, int(port), cause) from None
