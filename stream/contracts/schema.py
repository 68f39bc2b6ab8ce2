"""The published JSON Schemas of tickserve's records, and what counts as a breaking change.

`schemas/<name>-<MAJOR.MINOR>.json` ship in the package (and in docs/contracts.md):
`signal` (values on the signals topic), `tick` (values on the ticks topic) and
`deadletter-headers` (headers of a dead letter). Within one major version a schema
may only add optional properties, so every consumer written against an older minor
keeps working; `breaking_changes` names what would break them.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from stream.contracts.signal import SCHEMA_VERSION

NAMES = ("signal", "tick", "deadletter-headers")
VERSIONS = {"signal": SCHEMA_VERSION, "tick": "1.0", "deadletter-headers": "1.0"}


def load(name: str) -> dict[str, Any]:
    """The current schema `name` (one of NAMES) as a dict."""
    path = resources.files("stream.contracts") / "schemas" / f"{name}-{VERSIONS[name]}.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What in `new` would break a reader written against `old` (same major version).

    Breaking: a property removed, a property's type or allowed values narrowed or
    changed, a property newly required (old writers' records would fail), or
    additional properties forbidden. Adding optional properties is not breaking.

    >>> old = {"required": ["a"], "properties": {"a": {"type": "string"}}}
    >>> breaking_changes(old, {"required": ["a"], "properties": {"a": {"type": "string"},
    ...     "b": {"type": "integer"}}})
    []
    >>> breaking_changes(old, {"required": ["a", "b"], "properties": {"a": {"type": "integer"},
    ...     "b": {"type": "integer"}}})
    ['a: type changed', 'b: newly required']
    """
    out = []
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name, spec in old_props.items():
        if name not in new_props:
            out.append(f"{name}: removed")
            continue
        now = new_props[name]
        for key in ("type", "enum", "const", "pattern"):
            if key in spec and now.get(key) != spec[key]:
                if key == "enum" and set(spec[key]) <= set(now.get(key, [])):
                    continue  # more allowed values: old readers may meet a new one -> see below
                out.append(f"{name}: {key} changed")
        if "enum" in spec and set(now.get("enum", [])) - set(spec["enum"]):
            out.append(f"{name}: enum widened (old readers do not know the new values)")
    for name in sorted(set(new.get("required", [])) - set(old.get("required", []))):
        out.append(f"{name}: newly required")
    if old.get("additionalProperties", True) and new.get("additionalProperties") is False:
        out.append("additional properties forbidden")
    return out
