"""The docs stay true to the code: every command the README shows parses, every link resolves,
every setting it lists is read, every handle method it names exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import overlay
from packer.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SOURCES = "\n".join(p.read_text(encoding="utf-8") for d in ("overlay", "packer") for p in (ROOT / d).rglob("*.py"))


def _commands() -> list[str]:
    """Every ``$ habanero-pack ...`` line of the README's console blocks, and every inline one."""
    lines = [m.group(1) for m in re.finditer(r"^\$ (habanero-pack[^\n]*)$", README, re.MULTILINE)]
    lines += re.findall(r"`(habanero-pack [^`]+)`", README)
    return [line.split("  #")[0].strip() for line in lines]


def test_the_readme_shows_commands_at_all():
    assert len(_commands()) >= 15  # the pattern still finds them: the test below is not vacuous


@pytest.mark.parametrize("line", _commands())
def test_every_command_in_the_readme_parses(line):
    argv = [a for a in shlex.split(line)[1:] if a not in {"...", "…"}]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # --version and --help exit 0 after printing
        assert exc.code == 0, line


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_in_the_docs_resolves(doc):
    assert doc.exists(), f"{doc.name} is missing"
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_every_setting_the_readme_names_is_read_by_the_code():
    names = set(re.findall(r"\bHABANERO_[A-Z_]+\b", README))
    assert {"HABANERO_STORE", "HABANERO_RUNTIME_DIR", "HABANERO_DISABLE"} <= names
    unread = sorted(n for n in names if f'"{n}"' not in SOURCES)
    assert unread == [], f"the README names settings no code reads: {unread}"


def test_every_handle_method_the_readme_names_exists():
    names = set(re.findall(r"`ov\.([a-z_]+)", README))
    assert {"wsgi", "asgi", "apply", "rollback", "status"} <= names
    assert sorted(n for n in names if not hasattr(overlay.Overlay, n)) == []
