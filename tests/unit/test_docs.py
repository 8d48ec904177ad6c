"""The README and docs/ hold together: generated tables equal the code, links resolve, the README
stays a five-minute read, and .env.example documents every setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.settings import Settings, load_settings
from domain.errors import ErrorCode
from tools.docs_tables import TABLES, Table, committed, rewritten, stale

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
ENV_EXAMPLE = (ROOT / ".env.example").read_text(encoding="utf-8")
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
FIELDS = dict(Settings.model_fields)
SETTING_NAMES = [name.upper() for name in FIELDS]

README_MAX_BYTES = 12 * 1024
"""A five-minute read; the details live in docs/."""

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (code blocks left out)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file (code blocks left out)."""
    return _LINK.findall(_FENCE.sub("", path.read_text(encoding="utf-8")))


def local_links() -> list[tuple[str, str]]:
    """Every relative link of the README and docs/, as (page, target)."""
    found = []
    for page in PAGES:
        for target in links(page):
            if not re.match(r"[a-z]+:", target):
                found.append((str(page.relative_to(ROOT)), target))
    return found


# --- the README ------------------------------------------------------------------------------


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert first_block.strip().splitlines()[0].startswith("make demo")
    assert first_block.strip().splitlines()[1].startswith("make test")


def test_readme_is_a_five_minute_read() -> None:
    size = len(README.encode("utf-8"))
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move details to docs/"


@pytest.mark.parametrize("doc", [str(path.relative_to(ROOT)) for path in DOCS] + ["BENCHMARKS.md"])
def test_the_readme_links_to_every_doc(doc: str) -> None:
    assert doc in links(ROOT / "README.md"), f"README.md does not link to {doc}"


def test_the_readme_states_the_guarantees_and_links_each() -> None:
    section = README.split("## Delivery guarantees", 1)[1].split("\n## ", 1)[0]
    linked = {target.split("#", 1)[1] for target in _LINK.findall(section) if "#" in target}
    assert linked == anchors(ROOT / "docs" / "guarantees.md") - {"delivery-guarantees"}


def test_the_production_configuration_uses_the_backends_names() -> None:
    section = README.split("## Run it in production", 1)[1].split("\n## ", 1)[0]
    for name in (
        "RABBITMQ_HOST",
        "RABBITMQ_USER",
        "RABBITMQ_PASS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_STORAGE_BUCKET_NAME",
        "BACKEND_API_URL",
        "INTERNAL_API_TOKEN",
    ):
        assert name in section, name


# --- links -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("page", "target"), local_links())
def test_every_link_resolves(page: str, target: str) -> None:
    file_part, _, anchor = target.partition("#")
    path = (ROOT / page).parent / file_part if file_part else ROOT / page
    assert path.exists(), f"{page}: {target} does not exist"
    if anchor:
        assert anchor in anchors(path), f"{page}: {target}: no heading with that anchor"


def test_the_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](other.md#title) [b](#nowhere)\n```\n[c](in-code.md)\n```\n")
    assert links(page) == ["other.md#title", "#nowhere"]
    assert anchors(page) == {"title"}


def test_slugs_follow_github() -> None:
    assert slug(" 7. No message waits in the worker past the broker's patience") == (
        "7-no-message-waits-in-the-worker-past-the-brokers-patience"
    )
    assert slug("A rejected token is a misconfiguration; a refusing backend") == (
        "a-rejected-token-is-a-misconfiguration-a-refusing-backend"
    )


# --- generated tables ------------------------------------------------------------------------


@pytest.mark.parametrize("table", TABLES, ids=lambda table: table.name)
def test_the_committed_table_is_the_rendering(table: Table) -> None:
    text = (ROOT / table.path).read_text(encoding="utf-8")
    assert committed(table, text) == table.render(), f"{table.path} is stale: run make docs"


def test_a_stale_table_is_found_and_rewritten(tmp_path: Path) -> None:
    table = Table(path="page.md", name="t", render=lambda: "| a |\n|---|\n| 1 |")
    (tmp_path / "page.md").write_text(f"intro\n{table.begin}\n| old |\n{table.end}\nend\n")
    assert stale([table], root=tmp_path) == ["page.md: t"]
    fixed = rewritten(table, (tmp_path / "page.md").read_text())
    assert fixed == f"intro\n{table.begin}\n| a |\n|---|\n| 1 |\n{table.end}\nend\n"
    (tmp_path / "page.md").write_text(fixed)
    assert not stale([table], root=tmp_path)


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_setting_has_one_line_of_description(name: str) -> None:
    description = FIELDS[name.lower()].description
    assert description and description.strip() == description and "\n" not in description


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_setting_is_a_row_of_the_configuration_table(name: str) -> None:
    table = committed(TABLES[0], (ROOT / TABLES[0].path).read_text(encoding="utf-8"))
    assert f"\n| `{name}` |" in table


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_a_row_of_the_error_table(code: ErrorCode) -> None:
    table = committed(TABLES[1], (ROOT / TABLES[1].path).read_text(encoding="utf-8"))
    retryable = "yes" if code.retryable else "no"
    assert f"\n| `{code.value}` | {retryable} | {code.description} |" in table


@pytest.mark.parametrize("page", [str(page.relative_to(ROOT)) for page in PAGES])
def test_settings_and_codes_are_tabled_in_one_place(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    owners = {
        **{name: "docs/configuration.md" for name in SETTING_NAMES},
        **{code.value: "docs/error-codes.md" for code in ErrorCode},
    }
    for row in rows:
        first = row[3:].split("`", 1)[0]
        assert owners.get(first, page) == page, f"{page} tables {first}; see {owners.get(first)}"


# --- words -----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [str(page.relative_to(ROOT)) for page in PAGES])
def test_a_lora_in_the_pipeline_is_never_called_an_adapter(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    assert not re.search(r"\bLoRA[ -]adapters?\b|\badapter (cache|routing)\b", text, re.I)


# --- .env.example ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_setting_is_in_the_env_example(name: str) -> None:
    assert f"\n{name}=" in ENV_EXAMPLE or f"\n# {name}=" in ENV_EXAMPLE, name


def test_env_example_loads_as_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(ENV_EXAMPLE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    from_example = load_settings()
    monkeypatch.chdir("/")
    assert from_example.model_dump() == load_settings().model_dump()


# --- citations in the code ----------------------------------------------------------------

_CITATION = re.compile(r"(docs/[\w-]+\.md|README\.md|BENCHMARKS\.md)(?:,\s*\"([^\"]+)\")?")
CODE_FOLDERS = ("app", "domain", "ports", "adapters", "tests", "tools", "bench")


def code_citations() -> list[tuple[str, str, str]]:
    """Every document (and quoted section) a comment or docstring of the code cites, as
    (source file, document, section or "")."""
    found = []
    sources = [ROOT / "containers.py"]
    sources += [path for folder in CODE_FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))]
    for source in sources:
        text = re.sub(r"\n\s*(?:#\s*)?", " ", source.read_text(encoding="utf-8"))
        for document, section in _CITATION.findall(text):
            found.append((str(source.relative_to(ROOT)), document, section))
    return found


def test_the_code_cites_documents() -> None:
    assert len([cite for cite in code_citations() if cite[1].startswith("docs/")]) >= 10


@pytest.mark.parametrize(("source", "document", "section"), code_citations())
def test_every_document_the_code_cites_is_in_the_repository(
    source: str, document: str, section: str
) -> None:
    path = ROOT / document
    assert path.exists(), f"{source} cites {document}, which is not in the repository"
    if section:
        headings = [
            line.lstrip("#").strip()
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")
        ]
        assert section in headings, f'{source} cites {document}, "{section}": no such heading'
