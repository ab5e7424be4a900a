"""Real code none of us wrote, served through the overlay in a fresh interpreter.

The packages come from the test environment (pytest, cryptography and hypothesis pull them in) and
are bundled the way the packer would: ``.py`` files as modules and packages, everything else as data.
Each exercises something a toy app does not: idna's large generated tables, packaging's parsers,
pycparser's generator reading its ``_c_ast.cfg`` next to ``__file__``, attrs' two top-level packages
and ``.pyi`` data read through ``importlib.resources``, and Pygments' lexers imported by name at run
time. A finder placed right behind the overlay fails any import of these packages that would fall
through to the copy on disk, and every loaded module's ``__file__`` must sit in the store's tree.
"""

from __future__ import annotations

import json

import pytest
from support.overlay import package_files, populate_store, run_python

pytestmark = pytest.mark.slow  # a fresh interpreter

PACKAGES = ["idna", "packaging", "pycparser", "attr", "attrs", "pygments"]

CHILD = """
import ast, importlib.resources, io, json, os, sys

PACKAGES = {packages!r}
early = sorted(m for m in sys.modules if m.partition(".")[0] in PACKAGES)

import overlay

ov = overlay.install(packages=PACKAGES, trusted_keys={keys!r}, store={store!r}, app_id="thirdparty")


class FellThrough:
    \"\"\"Behind the overlay: an import of a served package reaching here would come from disk.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in PACKAGES:
            raise ImportError(f"{{name}} fell through to the copy on disk", name=name)
        return None


sys.meta_path.insert(1, FellThrough())
out = {{"early": early, "preimported": ov.status()["preimported"], "version": ov.version}}

import idna
out["idna"] = [idna.encode("ドメイン.テスト").decode(), idna.decode("xn--eckwd4c7c.xn--zckzah"),
               (importlib.resources.files("idna") / "py.typed").is_file()]

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
req = Requirement('habanero[bench]>=0.1,<1; python_version >= "3.8"')
out["packaging"] = [Version("1.0") < Version("2.0"), Version("1.0rc1").is_prerelease,
                    SpecifierSet(">=1.2,<2").contains("1.5"), sorted(req.extras), str(req.specifier),
                    req.marker.evaluate()]

from pycparser import c_generator, c_parser
from pycparser import _ast_gen, c_ast
tree = c_parser.CParser().parse("int add(int a, int b) {{ return a + b; }}")
generated = io.StringIO()
cfg = os.path.join(os.path.dirname(_ast_gen.__file__), "_c_ast.cfg")  # its own data file, beside it
_ast_gen.ASTCodeGenerator(cfg).generate(generated)
classes = {{n.name for n in ast.parse(generated.getvalue()).body if isinstance(n, ast.ClassDef)}}
out["pycparser"] = [c_generator.CGenerator().visit(tree).split(), cfg.startswith(str(ov.tree_root)),
                    sorted(classes - set(vars(c_ast))), len(classes) > 40]

import attr, attrs

@attrs.define
class Point:
    x: int
    y: int = 0

out["attrs"] = [attr.asdict(Point(1)), attrs.evolve(Point(1, 2), y=5) == Point(1, 5),
                "def attrib(" in (importlib.resources.files("attr") / "__init__.pyi").read_text()]

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
html = highlight('print("hi")', get_lexer_by_name("python"), HtmlFormatter())
out["pygments"] = ['<span class="nb">print</span>' in html, "pygments.lexers.python" in sys.modules]

files = {{name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())
          if name.partition(".")[0] in PACKAGES}}
out["outside"] = sorted(n for n, f in files.items() if not (f or "").startswith(str(ov.tree_root)))
out["served"] = len(files)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def real_files():
    files = {}
    for name in PACKAGES:
        pytest.importorskip(name)
        files.update(package_files(name))
    return files


def test_real_packages_import_and_work_from_the_bundle(real_files, make_bundle, trusted, trusted_keys_file,
                                                      tmp_path):
    store = tmp_path / "store"
    populate_store(store, trusted, "thirdparty", make_bundle(real_files, app_id="thirdparty", version=1))
    code = CHILD.format(packages=PACKAGES, keys=str(trusted_keys_file), store=str(store))
    out = json.loads(run_python(code, cwd=tmp_path).stdout.strip().splitlines()[-1])

    assert out["early"] == [] and out["preimported"] == [] and out["version"] == 1
    assert out["idna"] == ["xn--eckwd4c7c.xn--zckzah", "ドメイン.テスト", True]
    assert out["packaging"] == [True, True, True, ["bench"], "<1,>=0.1", True]
    assert out["pycparser"] == [["int", "add(int", "a,", "int", "b)", "{", "return", "a", "+", "b;", "}"],
                                True, [], True]
    assert out["attrs"] == [{"x": 1, "y": 0}, True, True]
    assert out["pygments"] == [True, True]
    assert out["outside"] == [] and out["served"] > 30
