"""MLflow webhook deliveries: check their signature and age, and say whether to poll now."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from tickserve.errors import WebhookRejected

ALIAS_ENTITY = "model_version_alias"
OUTCOMES = (
    "polling",
    "ignored",
    "disabled",
    "bad_headers",
    "bad_signature",
    "stale",
    "replayed",
    "malformed",
)

WEBHOOKS = Counter("model_webhooks_total", "MLflow webhook deliveries received", ["outcome"])
for _outcome in OUTCOMES:
    WEBHOOKS.labels(_outcome)  # every outcome shows from the start, at 0


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Whose deliveries are trusted, and which alias changes make the watcher poll.

    Attributes:
        secret: The secret the MLflow webhook was created with (HMAC-SHA256 key).
        model_name: Registered model the worker follows; other models are ignored.
        aliases: Aliases the worker follows (champion, and the challenger if any).
        wake: Makes the watcher poll now (`ModelWatcher.wake`); called on the loop.
        max_age_s: Deliveries signed further from now than this are refused (replays).
        seen: Delivery ids accepted within `max_age_s`: a second delivery of one is a
            replay, refused.
    """

    secret: SecretStr
    model_name: str
    aliases: tuple[str, ...]
    wake: Callable[[], None]
    max_age_s: float = 300.0
    seen: SeenDeliveries = field(default_factory=lambda: SeenDeliveries())


class WebhookPayload(BaseModel):
    """The JSON body MLflow posts (Standard Webhooks style, signed as a whole)."""

    model_config = ConfigDict(extra="ignore")

    entity: str = Field(description="what changed, e.g. model_version_alias")
    action: str = Field(description="created or deleted (moving an alias is 'created')")
    timestamp: str = Field(description="ISO 8601 time of the event")
    data: dict[str, Any] = Field(description="event fields: name, alias, version")


class SeenDeliveries:
    """Delivery ids accepted recently, so that a captured delivery cannot be replayed.

    Ids older than the age limit need not be kept: `verify` refuses those anyway.
    Bounded: past `limit` ids the oldest go first.
    """

    def __init__(self, limit: int = 10_000) -> None:
        """Remember at most `limit` ids."""
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def admit(self, delivery_id: str, now_s: float, max_age_s: float) -> None:
        """Remember `delivery_id`, or raise WebhookRejected("replayed") if seen already."""
        seen = self._seen
        while seen and (
            next(iter(seen.values())) < now_s - 2 * max_age_s or len(seen) >= self.limit
        ):
            seen.popitem(last=False)
        if delivery_id in seen:
            raise WebhookRejected(f"delivery {delivery_id!r} was accepted already", "replayed")
        seen[delivery_id] = now_s


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for one delivery.

    >>> signature("s3cret", "d-1", "1700000000", b"{}")
    'v1,ffAlUwnIkZyROfdeDakYdx/QELuJ1gjEmzbfJrcVam0='
    """
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str,
    signature_header: str | None,
    timestamp: str | None,
    delivery_id: str | None,
    body: bytes,
    now_s: float,
    max_age_s: float = 300.0,
) -> WebhookPayload:
    """Check one delivery and parse its body.

    Args:
        secret: The webhook's secret.
        signature_header: `X-MLflow-Signature`: "v1,<base64>", several separated by spaces.
        timestamp: `X-MLflow-Timestamp`, Unix seconds, part of what is signed.
        delivery_id: `X-MLflow-Delivery-Id`, part of what is signed.
        body: The raw request body, exactly as received.
        now_s: The current Unix time.
        max_age_s: How far the signed time may be from `now_s`, either way.

    Raises:
        WebhookRejected: A header is missing, the signature does not match, the
            delivery is too old (a replay) or too far ahead, or the body is not
            MLflow's JSON.
    """
    if not (signature_header and timestamp and delivery_id):
        raise WebhookRejected(
            "missing X-MLflow-Signature, X-MLflow-Timestamp or X-MLflow-Delivery-Id "
            "(was the MLflow webhook created with a secret?)",
            "bad_headers",
        )
    expected = signature(secret, delivery_id, timestamp, body).encode()
    if not any(hmac.compare_digest(s.encode(), expected) for s in signature_header.split()):
        raise WebhookRejected("signature does not match the configured secret", "bad_signature")
    try:
        age_s = now_s - int(timestamp)
    except ValueError:
        raise WebhookRejected(
            f"X-MLflow-Timestamp is not Unix seconds: {timestamp!r}", "bad_headers"
        ) from None
    if abs(age_s) > max_age_s:
        raise WebhookRejected(
            f"signed {age_s:.0f} s from now, more than {max_age_s:.0f} s (replayed or clock skew)",
            "stale",
        )
    try:
        return WebhookPayload.model_validate_json(body)
    except ValidationError as exc:
        raise WebhookRejected(
            f"not an MLflow webhook body: {exc.errors()[0]['msg']}", "malformed"
        ) from None


def ignore_reason(payload: WebhookPayload, model_name: str, aliases: tuple[str, ...]) -> str:
    """Why this event cannot change what the worker serves ("" when it can: poll now).

    Raises:
        WebhookRejected: An alias event without a name or an alias.
    """
    if payload.entity != ALIAS_ENTITY:
        return f"not an alias event ({payload.entity}.{payload.action})"
    name, alias = payload.data.get("name"), payload.data.get("alias")
    if not isinstance(name, str) or not isinstance(alias, str):
        raise WebhookRejected("an alias event needs data.name and data.alias", "malformed")
    if name != model_name:
        return f"model {name!r} is not followed ({model_name!r} is)"
    if alias not in aliases:
        return f"alias {alias!r} is not followed ({', '.join(aliases)})"
    return ""
