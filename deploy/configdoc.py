"""docs/configuration.md generated from `Settings`: `python -m deploy.configdoc [--check]`.

One row per field of the settings model: the environment variables that set it,
its type and range, its default, and its description. The description is the
field's `Field(description=...)`, else the comment above the field or at the end of
its line. A comment line that opens a block after a blank line and reads like a
title (`# Kafka`, `# Redis / Feast`) starts a section of the table instead.
`tests/test_configdoc.py` fails when the committed file differs from what this
writes, so the table cannot drift from the code.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import annotated_types
from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from deploy.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
_TOOL_COMMENTS = ("fmt:", "type:", "noqa", "pragma")
_TITLE_WORDS = 4

HEADER = """\
# Configuration

Every setting of a tickserve process, read once at start-up from the environment
(`deploy/settings.py`). A bad value stops the command with one line naming the
variable, e.g. `tickserve serve: error: bad setting TICKSERVE_MAX_BATCH: ...`.
Secrets are held as `SecretStr` and never printed.

This file is generated: edit the descriptions in `deploy/settings.py`, then run
`python -m deploy.configdoc` (the test `tests/test_configdoc.py` fails while it is stale).
"""


@dataclass(frozen=True, slots=True)
class SettingRow:
    """One setting as the table shows it."""

    name: str
    env: tuple[str, ...]
    type: str
    default: str
    description: str
    section: str


@dataclass(frozen=True, slots=True)
class _Comments:
    """What the source says about one field: its comment and the section it sits in."""

    text: str
    section: str


def field_comments(model: type[BaseSettings]) -> dict[str, _Comments]:
    """Comments of each annotated field in `model`'s class body, and its section title."""
    source = textwrap.dedent(inspect.getsource(model))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if not text.startswith(_TOOL_COMMENTS):
                comments[token.start[0]] = text
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    found: dict[str, _Comments] = {}
    section = ""
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            if line in comments:
                above.insert(0, comments[line])
            line -= 1
        block_follows_blank = line >= 1 and not lines[line - 1].strip()
        if above and block_follows_blank and _is_title(above[0]):
            section = above.pop(0)
        trailing = [comments[n] for n in (node.lineno, node.end_lineno) if n in comments]
        text = " ".join([*above, *dict.fromkeys(trailing)])
        found[node.target.id] = _Comments(text, section)
    return found


def _is_title(comment: str) -> bool:
    """A short comment without sentence punctuation: a section title, not a description."""
    return len(comment.split()) <= _TITLE_WORDS and not any(c in comment for c in ".,:;()=")


def env_names(name: str, field: FieldInfo, prefix: str) -> tuple[str, ...]:
    """The environment variables that set `field`, in the order pydantic tries them."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        names = tuple(c for c in alias.choices if isinstance(c, str) and c.isupper())
        if names:
            return names
    if isinstance(alias, str):
        return (alias,)
    return (f"{prefix}{name}".upper(),)


def type_name(field: FieldInfo) -> str:
    """The field's type for a reader: `int`, `str`, `path`, `secret`, with its range."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = kept[0] if len(kept) == 1 else annotation
    names: dict[object, str] = {bool: "bool", int: "int", float: "float", str: "str", Path: "path"}
    shown = names.get(annotation) or str(getattr(annotation, "__name__", annotation))
    if typing.get_origin(annotation) is typing.Literal:
        shown = " | ".join(str(choice) for choice in typing.get_args(annotation))
    if shown == "SecretStr":
        shown = "secret"
    low = high = ""
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            low = f">= {_value(rule.ge)}"
        elif isinstance(rule, annotated_types.Gt):
            low = f"> {_value(rule.gt)}"
        elif isinstance(rule, annotated_types.Le):
            high = f"<= {_value(rule.le)}"
        elif isinstance(rule, annotated_types.Lt):
            high = f"< {_value(rule.lt)}"
    if low.startswith(">=") and high.startswith("<="):
        return f"{shown}, {low[3:]}..{high[3:]}"
    bounds = ", ".join(b for b in (low, high) if b)
    return f"{shown}, {bounds}" if bounds else shown


def _value(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str | Path):
        return f'"{value}"' if value == "" else str(value)
    return str(value)


def rows(model: type[BaseSettings] = Settings) -> list[SettingRow]:
    """Every field of `model`, in source order, as a table row."""
    prefix = str(model.model_config.get("env_prefix", ""))
    comments = field_comments(model)
    out = []
    for name, field in model.model_fields.items():
        said = comments.get(name, _Comments("", ""))
        description = field.description or said.text
        description = description[:1].upper() + description[1:]
        out.append(
            SettingRow(
                name=name,
                env=env_names(name, field, prefix),
                type=type_name(field),
                default=_value(field.get_default(call_default_factory=True)),
                description=description,
                section=said.section,
            )
        )
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(model: type[BaseSettings] = Settings) -> str:
    """The whole markdown file for `model`."""
    parts = [HEADER]
    section: str | None = None
    for row in rows(model):
        if row.section != section:
            section = row.section
            parts.append(f"\n## {section or 'General'}\n\n")
            parts.append(
                "| variable | type | default | what it does |\n| --- | --- | --- | --- |\n"
            )
        env = " or ".join(f"`{e}`" for e in row.env)
        default = row.default if row.default == "unset" else f"`{_cell(row.default)}`"
        parts.append(f"| {env} | {_cell(row.type)} | {default} | {_cell(row.description)} |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Write docs/configuration.md, or with --check say whether it is current (exit 1 if not)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.configdoc", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=Path, default=DOC, help="the markdown file")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m deploy.configdoc", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(rows())} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
