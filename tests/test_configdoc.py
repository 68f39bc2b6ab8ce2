"""docs/configuration.md is what `deploy.configdoc` writes from `Settings`, so it cannot drift."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from deploy.configdoc import DOC, main, render, rows
from deploy.settings import Settings


def test_committed_configuration_md_is_the_generated_one() -> None:
    assert DOC.read_text() == render(), (
        "docs/configuration.md is stale: run `python -m deploy.configdoc` and commit it"
    )


def test_every_setting_is_in_the_table_with_a_description() -> None:
    table = rows()
    assert [r.name for r in table] == list(Settings.model_fields)
    undescribed = [r.name for r in table if not r.description]
    assert not undescribed, (
        f"give these a Field(description=...) in deploy/settings.py: {undescribed}"
    )


def test_check_mode_fails_on_a_stale_file(tmp_path, capsys) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n")
    assert main(["--check", "--out", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["--out", str(stale)]) == 0
    assert main(["--check", "--out", str(stale)]) == 0


class Example(BaseSettings):
    """A settings model shaped like ours, to pin how each part of a row is found."""

    model_config = SettingsConfigDict(env_prefix="EX_", frozen=True)

    # Things
    port: int = Field(8, ge=1, le=9)  # the port
    # what the name is for,
    # over two lines
    name: str = "n"
    ratio: float = Field(0.5, gt=0, description="from the field; the comment is ignored")  # no

    # Other things
    url: str | None = Field(
        None, validation_alias=AliasChoices("EX_URL", "URL", "url"), description="where"
    )  # fmt: skip (a tool comment: never a description)
    secret: SecretStr | None = None  # a secret


def test_rows_take_env_names_types_defaults_descriptions_and_sections() -> None:
    by_name = {r.name: r for r in rows(Example)}
    port, name, ratio = by_name["port"], by_name["name"], by_name["ratio"]
    assert (port.env, port.type, port.default) == (("EX_PORT",), "int, 1..9", "8")
    assert (port.description, port.section) == ("The port", "Things")
    assert (name.description, name.section) == ("What the name is for, over two lines", "Things")
    assert (ratio.type, ratio.default) == ("float, > 0", "0.5")
    assert ratio.description == "From the field; the comment is ignored"
    url, secret = by_name["url"], by_name["secret"]
    assert (url.env, url.type, url.default) == (("EX_URL", "URL"), "str", "unset")
    assert url.description == "Where"
    assert url.section == "Other things"
    assert (secret.type, secret.description) == ("secret", "A secret")


def test_rendered_table_has_one_section_per_title() -> None:
    text = render(Example)
    assert text.count("## Things") == 1
    assert text.count("## Other things") == 1
    assert "| `EX_URL` or `URL` | str | unset | Where |" in text
