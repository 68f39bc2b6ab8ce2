"""How every Kafka client of tickserve connects: TLS and SASL settings, one set for all.

`KafkaSecurity` is built once from the settings (`deploy.settings.Settings.kafka_security`)
and handed to every client: aiokafka's (`aiokafka_kwargs`), librdkafka's
(`librdkafka_config`: the exactly-once plane, the bench's floor) and the wire data path's own
connections (`stream.kafka.wire.Connection.open`, which also runs `stream.kafka.sasl`).
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from tickserve.errors import ConfigError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """Transport security of a Kafka client (Kafka's `security.protocol` and friends).

    Attributes:
        protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
        ca_file: PEM file of the CAs that sign the brokers' certificates; None: the
            system's trust store.
        cert_file: The client's certificate (PEM) for mutual TLS; it may hold the key too.
        key_file: The client certificate's private key (PEM, unencrypted).
        check_hostname: The broker's certificate must name the host dialled.
        sasl_mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL protocols).
        username: SASL username.
        password: SASL password (masked in repr and logs).
    """

    protocol: str = "PLAINTEXT"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True
    sasl_mechanism: str = "PLAIN"
    username: str = ""
    password: SecretStr | None = None

    def __post_init__(self) -> None:
        """Refuse what no client could use (the settings name the variables first)."""
        if self.protocol not in PROTOCOLS:
            msg = f"unknown Kafka security protocol {self.protocol!r} (one of {PROTOCOLS})"
            raise ConfigError(msg)
        if self.sasl and self.sasl_mechanism not in MECHANISMS:
            msg = f"unsupported SASL mechanism {self.sasl_mechanism!r} (one of {MECHANISMS})"
            raise ConfigError(msg)

    @property
    def tls(self) -> bool:
        """Connections are TLS (SSL, SASL_SSL)."""
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        """Connections log in with SASL (SASL_PLAINTEXT, SASL_SSL)."""
        return self.protocol.startswith("SASL_")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS client context (one per distinct setting, shared); None without TLS.

        Raises:
            ConfigError: A CA, certificate or key file is missing or unreadable.
        """
        if not self.tls:
            return None
        return _context(self.ca_file, self.cert_file, self.key_file, self.check_hostname)

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's clients (none for PLAINTEXT: their defaults)."""
        if self.protocol == "PLAINTEXT":
            return {}
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.username
            kwargs["sasl_plain_password"] = (
                self.password.get_secret_value() if self.password else ""
            )
        return kwargs

    def librdkafka_config(self) -> dict[str, Any]:
        """Settings for librdkafka (confluent-kafka's clients): TLS files, SASL login."""
        config: dict[str, Any] = {"security.protocol": self.protocol.lower()}
        if self.tls:
            if self.ca_file is not None:
                config["ssl.ca.location"] = str(self.ca_file)
            if self.cert_file is not None:
                config["ssl.certificate.location"] = str(self.cert_file)
            if self.key_file is not None:
                config["ssl.key.location"] = str(self.key_file)
            config["ssl.endpoint.identification.algorithm"] = (
                "https" if self.check_hostname else "none"
            )
        if self.sasl:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.username
            config["sasl.password"] = self.password.get_secret_value() if self.password else ""
        return config

    def describe(self) -> str:
        """What a log line may say about it (never the password)."""
        what = [self.protocol]
        if self.sasl:
            what.append(f"{self.sasl_mechanism} as {self.username}")
        if self.tls and self.cert_file is not None:
            what.append("client certificate")
        return ", ".join(what)


PLAINTEXT = KafkaSecurity()


@functools.cache
def _context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None, check_hostname: bool
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(f) for f in (ca_file, cert_file, key_file) if f is not None)
        raise ConfigError(f"cannot load the Kafka TLS files ({files}): {exc}") from exc
    # check_hostname needs CERT_REQUIRED, which create_default_context sets; without it
    # the chain is still verified against the CAs
    context.check_hostname = check_hostname
    return context
