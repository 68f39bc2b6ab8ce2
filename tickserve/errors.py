"""The exception tree every tickserve package raises from."""

from __future__ import annotations


class TickserveError(Exception):
    """Root of every error tickserve raises on purpose."""


class ConfigError(TickserveError):
    """Configuration is invalid or points at something that is not there."""


class StackError(TickserveError):
    """A component of the local stack did not start or is not reachable."""

    def __init__(self, component: str, message: str, log_file: str | None = None) -> None:
        where = f" (log: {log_file})" if log_file else ""
        super().__init__(f"{component}: {message}{where}")
        self.component = component
        self.log_file = log_file


class InvalidTick(TickserveError):
    """A tick failed to decode or validate; carries the dead-letter reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ModelError(TickserveError):
    """A model could not be found, loaded or trusted."""


class ModelNotFound(ModelError):
    """No model version behind the requested name and alias."""


class ModelRejected(ModelError):
    """A model version was loaded but failed a check and must not serve.

    Attributes:
        reason: Short label of the failed check (a metric label), e.g. `golden`.
        version: The rejected model version, when known.
    """

    def __init__(self, message: str, reason: str = "invalid", version: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.version = version


class StaleRow(TickserveError):
    """A row waited past its staleness deadline and was dropped unscored."""


class DataError(TickserveError):
    """Input data for features or training is unusable (empty, too short, malformed)."""


class UnsupportedSchema(DataError):
    """A record written under a schema major version newer than this reader knows."""


class BudgetExceeded(TickserveError):
    """This month's logged training cost is over the configured budget."""


class WebhookRejected(TickserveError):
    """A webhook delivery was refused before it could change anything.

    Attributes:
        reason: Short label (a metric label): `bad_headers`, `bad_signature`, `stale`
            or `malformed`.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ServiceError(TickserveError):
    """A service tickserve calls (broker, Redis, ClickHouse, MLflow) failed a request.

    Raised where the library's own exception is caught, with that exception as
    `__cause__`; the message starts with the component.

    Attributes:
        component: What failed, e.g. `broker`, `online-store`, `snapshots`, `archive`
            or `registry`.
    """

    def __init__(self, component: str, message: str) -> None:
        super().__init__(f"{component}: {message}")
        self.component = component


class BrokerError(ServiceError):
    """The Kafka broker refused or failed a request.

    Attributes:
        topic: The topic concerned, when one is.
        partition: The partition concerned, when one is.
        offset: The offset concerned, when one is.
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        context = [("topic", topic), ("partition", partition), ("offset", offset)]
        where = ", ".join(f"{name} {value}" for name, value in context if value is not None)
        super().__init__("broker", f"{message} ({where})" if where else message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class BrokerUnavailable(BrokerError):
    """No Kafka broker answered at the bootstrap address.

    Attributes:
        bootstrap: The `host:port` that was tried.
    """

    def __init__(self, bootstrap: str, detail: str) -> None:
        super().__init__(f"cannot reach the Kafka broker at {bootstrap}: {detail}")
        self.bootstrap = bootstrap


class BrokerAuthError(BrokerError):
    """The broker refused our TLS handshake or SASL login: retrying cannot help.

    The message names what failed (certificate, mechanism, login) and never holds the
    password.
    """


class BrokerIncompatible(BrokerError):
    """The broker serves no version of a data-path api that tickserve implements.

    Attributes:
        api: The api, e.g. `Fetch` or `Produce`.
        ours: The (lowest, highest) versions tickserve implements.
        theirs: The (lowest, highest) versions the broker serves; None if it lacks the api.
        address: The broker's `host:port`.
    """

    def __init__(
        self, api: str, ours: tuple[int, int], theirs: tuple[int, int] | None, address: str
    ) -> None:
        offered = f"versions {theirs[0]}..{theirs[1]}" if theirs else "no version"
        super().__init__(
            f"{address} serves {api} {offered}, tickserve implements {ours[0]}..{ours[1]}:"
            " no version in common"
        )
        self.api = api
        self.ours = ours
        self.theirs = theirs
        self.address = address


class OnlineStoreError(ServiceError):
    """Redis failed a read or write of online features or of state snapshots.

    Attributes:
        key: The Redis key concerned, when one is.
    """

    def __init__(
        self, message: str, *, key: str | None = None, component: str = "online-store"
    ) -> None:
        super().__init__(component, f"{message} (key {key})" if key else message)
        self.key = key


class ArchiveError(ServiceError):
    """ClickHouse failed a statement on an archive table.

    Attributes:
        table: The table the statement was about (`ticks` or `signals`).
    """

    def __init__(self, message: str, *, table: str) -> None:
        super().__init__("archive", f"{message} (table {table})")
        self.table = table


class RegistryError(ServiceError):
    """The MLflow tracking server, model registry or artifact store failed a call.

    Attributes:
        model: The registered model name, when one is concerned.
        version: The model version, when one is concerned.
    """

    def __init__(self, message: str, *, model: str = "", version: str = "") -> None:
        what = f"{model} v{version}" if model and version else model
        super().__init__("registry", f"{what}: {message}" if what else message)
        self.model = model
        self.version = version


class OffsetCommitFailed(BrokerError):
    """The group refused an offset commit (it moved on: a rebalance); the records replay.

    Attributes:
        group_id: The consumer group.
        offsets: The next offsets that were not committed, per (topic, partition).
    """

    def __init__(self, group_id: str, offsets: dict[tuple[str, int], int], reason: str) -> None:
        where = ", ".join(f"{t}/{p}@{offset}" for (t, p), offset in sorted(offsets.items()))
        super().__init__(f"group {group_id}: commit of {where} failed: {reason}")
        self.group_id = group_id
        self.offsets = offsets


class TransactionFailed(BrokerError):
    """A Kafka transaction of the exactly-once data plane failed; the worker ends.

    What was produced since the last commit is aborted (read_committed consumers never
    see it); the restarted worker reads on from the committed offsets.

    Attributes:
        transactional_id: The producer's transactional id.
        step: The call that failed (init_transactions, commit_transaction, ...).
        abortable: The producer can still abort the transaction (false when it was
            fenced or failed fatally: the broker aborts it at its timeout then).
        retriable: The same call may succeed if made again (a timeout).
    """

    def __init__(
        self,
        transactional_id: str,
        step: str,
        reason: str,
        abortable: bool = False,
        retriable: bool = False,
    ) -> None:
        super().__init__(f"transaction of {transactional_id}: {step} failed: {reason}")
        self.transactional_id = transactional_id
        self.step = step
        self.abortable = abortable
        self.retriable = retriable
