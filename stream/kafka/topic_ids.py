"""Topic ids (KIP-516) for the Fetch and Produce versions that name a topic by its id.

Fetch and Produce from v13 carry a topic's 16-byte id instead of its name; the id
comes from a Metadata (v10+) answer. As the Java client does, a topic whose id the
broker does not give (none assigned, or the topic unknown to Metadata yet) is named
instead, at the highest version that still takes a name (12). An id the broker stops
recognising (the topic was deleted and created again) is forgotten and asked again;
when the answer is another id, the topic was recreated (`recreated`): every position in
it belongs to a log that is gone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiokafka.errors import KafkaError

from stream.kafka import protocol

if TYPE_CHECKING:
    from stream.kafka.wire import Connection

logger = logging.getLogger(__name__)

NAMES_UP_TO = protocol.TOPIC_IDS_FROM - 1
# a request naming a topic by an id the broker no longer holds (Tansu answers 3)
STALE_ID_ERRORS = frozenset({3, 100, 103})  # unknown topic, unknown topic id, inconsistent id


class StaleTopicId(KafkaError):  # type: ignore[misc]  # aiokafka is untyped
    """A request named a topic by an id its broker no longer holds: the id is asked again."""

    retriable = True
    invalid_metadata = True


class TopicIds:
    """Each topic's id as a broker gave it (None: it gave none, so the topic is named)."""

    def __init__(self, recreation: bool = False) -> None:
        """With `recreation` (a fetcher), a forgotten id is compared with the next one.

        Until the topic is known again, `resolve` raises `StaleTopicId` instead of
        naming it. A producer goes without: it names a topic it cannot find (the
        broker may create it on the first produce).
        """
        self._ids: dict[str, bytes | None] = {}
        self._recreation = recreation
        self._forgotten: dict[str, bytes] = {}  # the id a broker stopped recognising
        self._recreated: set[str] = set()

    def ready(self, topic: str, version: int) -> bool:
        """Whether a request at `version` for `topic` can be built now (no Metadata to ask)."""
        return version < protocol.TOPIC_IDS_FROM or topic in self._ids

    def pick(self, topic: str, version: int) -> tuple[int, str | bytes]:
        """The version to send at (at most `version`) and the topic's name or id for it.

        Call after `ready` (or `resolve`) for a version from 13 on.
        """
        if version < protocol.TOPIC_IDS_FROM:
            return version, topic
        topic_id = self._ids[topic]
        return (version, topic_id) if topic_id is not None else (NAMES_UP_TO, topic)

    async def resolve(self, conn: Connection, topic: str, version: int) -> None:
        """Ask `conn`'s broker for `topic`'s id if a request at `version` needs it."""
        if self.ready(topic, version):
            return
        versions = conn.settled
        if versions.metadata is None:  # `negotiate` keeps versions below 13 then
            self._ids[topic] = None
            return
        body = await conn.request(
            protocol.METADATA,
            versions.metadata,
            [protocol.metadata_request([topic], versions.metadata)],
        )
        found = [
            t for t in protocol.parse_metadata_response(body, versions.metadata) if t.name == topic
        ]
        known = bool(found) and found[0].error == 0
        if not known and topic in self._forgotten:
            # deleted, not (yet) created again: ask again next time, so that the new
            # topic's id is compared with the old one (named meanwhile, it would be read
            # from positions in the old log)
            raise StaleTopicId(f"{topic} is not known to the broker (deleted?)")
        topic_id = found[0].topic_id if known else None
        if topic_id == protocol.NO_TOPIC_ID:
            topic_id = None
        if topic_id is None:
            logger.info("no topic id, the topic is named", extra={"topic": topic})
        old = self._forgotten.pop(topic, None)
        if old is not None and topic_id is not None and topic_id != old:
            self._recreated.add(topic)
        self._ids[topic] = topic_id

    def forget(self, topic: str) -> None:
        """Ask for `topic`'s id again before the next request that needs it."""
        old = self._ids.pop(topic, None)
        if old is not None and self._recreation:
            self._forgotten[topic] = old

    def recreated(self, topic: str) -> bool:
        """Whether `topic` came back under another id since the last call (then forgotten)."""
        if topic not in self._recreated:
            return False
        self._recreated.discard(topic)
        return True

    def matches(self, topic: str, key: str | bytes) -> bool:
        """Whether a response's topic (a name, or an id) is `topic`, asked alone by it.

        A broker that does not know the id asked for may answer under the null id
        (Tansu does; Kafka echoes the id): with one topic per request, that is ours.
        """
        if isinstance(key, str):
            return key == topic
        return key == self._ids.get(topic) or key == protocol.NO_TOPIC_ID
