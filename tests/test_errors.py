"""The error tree drawn in overlay/errors.py and the README's list hold every code habanero raises."""

from __future__ import annotations

import re
from pathlib import Path

import overlay
from overlay import errors

ROOT = Path(__file__).resolve().parent.parent
_RAISED = re.compile(r"""\bcode\s*=\s*["']([a-z_]+)["']|default_code\s*=\s*["']([a-z_]+)["']|"code":\s*"([a-z_]+)\"""")
_TREE_LINE = re.compile(r"^    [│ ]*(?:(?:├──|└──) )?(\w+Error|\w+)\s{2,}(.*)$")
_CONTINUED = re.compile(r"^    [│ ]*\s{8,}(.*)$")


def _sources() -> list[Path]:
    return [p for d in ("overlay", "packer") for p in (ROOT / d).rglob("*.py")]


def _raised_codes() -> set[str]:
    found: set[str] = set()
    for path in _sources():
        for match in _RAISED.finditer(path.read_text(encoding="utf-8")):
            found.add(next(group for group in match.groups() if group))
    return found


def _codes_in(text: str) -> set[str]:
    """The codes a line lists: comma-separated names, outside any parenthesised remark."""
    text = re.sub(r"\([^)]*\)?|\([^)]*$|^[^(]*\)", "", text)
    return {part.strip() for part in text.split(",") if re.fullmatch(r"[a-z]+(_[a-z]+)*", part.strip())}


def _tree() -> dict[str, set[str]]:
    """Class name -> the codes its line (and the lines continuing it) lists."""
    doc = errors.__doc__ or ""
    block = doc[doc.index("    HabaneroError"): doc.index("\n\n", doc.index("    HabaneroError"))]
    tree: dict[str, set[str]] = {}
    current = ""
    for line in block.splitlines():
        match = _TREE_LINE.match(line)
        if match and match[1][0].isupper():
            current = match[1]
            tree[current] = _codes_in(match[2])
        elif (more := _CONTINUED.match(line)) and current:
            tree[current] |= _codes_in(more[1])
    return tree


def test_every_code_raised_is_in_the_tree_and_under_a_class_that_exists():
    tree = _tree()
    answered = set(re.findall(r"``([a-z_]+)``", (errors.__doc__ or "").split("\n\n")[-1]))  # not raised: answered
    listed = set().union(*tree.values()) | answered
    missing = sorted(_raised_codes() - listed)
    assert missing == [], f"codes raised but not drawn in overlay/errors.py's tree: {missing}"
    for name, codes in tree.items():
        cls = getattr(errors, name, None)
        assert isinstance(cls, type) and issubclass(cls, errors.HabaneroError), f"{name} is not an error class"
        if name != "HabaneroError":
            assert cls.default_code in codes, f"{name}'s default code {cls.default_code} is not on its line"


def test_every_code_raised_is_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Errors"):]
    section = section[: section.index("\n## ", 4)] if "\n## " in section[4:] else section
    missing = sorted(code for code in _raised_codes() if f"`{code}`" not in section)
    assert missing == [], f"codes raised but not in the README's Errors section: {missing}"


def test_every_error_class_is_public_and_in_the_tree():
    tree = _tree()
    assert set(tree) == set(errors.__all__)
    for name in errors.__all__:
        assert name in tree, f"{name} is not drawn in the tree"
        assert getattr(overlay, name) is getattr(errors, name), f"overlay.{name} is not exported"


def test_no_bare_base_error_leaves_the_product():
    # A refusal is always one of the leaves: scripts match on classes as well as codes.
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in _sources()
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"raise (HabaneroError|BundleRejected)\(", line)]
    assert offenders == []


def test_the_import_error_is_an_import_error_and_the_remote_error_carries_the_apps_answer():
    imported = errors.OverlayImportError("no such module", name="shop.cart", code="not_in_bundle")
    assert isinstance(imported, ImportError) and imported.name == "shop.cart" and imported.code == "not_in_bundle"
    remote = errors.RemoteError("version 3 is not newer", code="stale_version", status=409, body={"code": "x"})
    assert (remote.code, remote.status, remote.body) == ("stale_version", 409, {"code": "x"})
    assert isinstance(remote, errors.HabaneroError)


def test_the_checker_finds_codes_written_every_way_they_are_written(tmp_path):
    sample = 'raise X("m", code="one_two")\nclass A:\n    default_code = "three"\nd = {"code": "four_five"}\n'
    assert {next(g for g in m.groups() if g) for m in _RAISED.finditer(sample)} == {"one_two", "three", "four_five"}


def _raises_with_code() -> list[tuple[str, str, str]]:
    """Every ``SomeError(..., code="x")`` in the product: (where, class name, code)."""
    import ast

    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name not in errors.__all__:
                continue
            for keyword in node.keywords:
                if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", name, keyword.value.value))
    return found


def test_every_code_is_raised_by_the_class_whose_line_lists_it():
    """Catching ``DeployInProgress`` must catch every ``deploy_in_progress``: a code belongs to one class."""
    tree = _tree()
    raises = _raises_with_code()
    assert len(raises) > 50  # the walk still finds them
    wrong = [f"{where}: {name}(code={code!r}) but {code} is not on {name}'s line"
             for where, name, code in raises if code not in tree.get(name, set())]
    assert wrong == []
