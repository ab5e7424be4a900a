"""The Flask integration: after a push, a live Flask app serves what a fresh start would serve.

Each test starts a small shop from disk (as an app does before its first push), requests it once
(Flask then refuses setup calls), pushes an edited copy through ``Overlay.apply`` on a real store,
and asks the live app object through Flask's test client.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.overlay import tree_entries

import overlay
from overlay.bundle import build_bundle
from overlay.errors import ActivationFailed
from overlay.keys import SigningKey

# Loaded once for the whole run, before any test's import state is taken: Flask's classes must stay
# the ones the integration patched and checks against.
flask = pytest.importorskip("flask")
importlib.import_module("overlay.integrations.flask")

SHOP = {
    "flshop/__init__.py": "",
    "flshop/views.py": '''
        from flask import Flask, render_template

        from flshop.catalog import bp

        app = Flask(__name__)
        SEEN = []


        @app.before_request
        def count():
            SEEN.append("count")


        @app.get("/")
        def index():
            return "home"


        @app.get("/old")
        def old():
            return "old page"


        @app.get("/page")
        def page():
            return render_template("page.html", name="v1")


        app.register_blueprint(bp, url_prefix="/shop")
        ''',
    "flshop/catalog.py": '''
        from flask import Blueprint

        bp = Blueprint("catalog", __name__)


        @bp.get("/items")
        def items():
            return "items"
        ''',
    "flshop/templates/page.html": "page {{ name }} v1",
    "flshop/static/site.css": "body { color: red }",
}


@dataclass
class Shop:
    """The shop's app running in this process, and the developer's copy to edit and push."""

    ov: Any
    key: SigningKey
    dev: Path

    @property
    def app(self) -> Any:
        return sys.modules["flshop.views"].app

    def get(self, path: str) -> tuple[int, str]:
        response = self.app.test_client().get(path)
        try:
            return response.status_code, response.get_data(as_text=True)
        finally:
            response.close()

    def edit(self, rel: str, old: str, new: str) -> None:
        path = self.dev / rel
        text = path.read_text()
        assert old in text, f"{old!r} is not in {rel}"
        path.write_text(text.replace(old, new, 1))

    def append(self, rel: str, text: str) -> None:
        with (self.dev / rel).open("a") as fh:
            fh.write(textwrap.dedent(text))

    def push(self) -> Any:
        files = tree_entries(self.dev / "flshop", self.dev)
        version = self.ov.store.highest + 1
        return self.ov.apply(build_bundle(files, app_id="flshop", version=version, signers=[self.key]))


def _write(root: Path) -> Path:
    for rel, text in SHOP.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


@pytest.fixture
def shop(import_state, tmp_path, trusted_keys_file, signing_key, monkeypatch) -> Iterator[Shop]:
    """The shop imported from disk and serving (one request made), with the overlay installed."""
    for name in ("PACKAGES", "TRUSTED_KEYS", "STORE", "LISTEN", "APP_ID", "DISABLE", "CODE_CACHE", "SYNC"):
        monkeypatch.delenv(f"HABANERO_{name}", raising=False)
    sys.path.insert(0, str(_write(tmp_path / "disk")))
    ov = overlay.install(packages=["flshop"], trusted_keys=trusted_keys_file, store=tmp_path / "store")
    try:
        importlib.import_module("flshop.views")
        running = Shop(ov, signing_key, _write(tmp_path / "dev"))
        assert running.get("/") == (200, "home")
        yield running
    finally:
        ov.uninstall()


def _url_map(app: Any) -> tuple[Any, ...]:
    """Everything of an app's URL map and views, by identity."""
    url_map = app.url_map
    return (url_map._matcher, url_map._rules_by_endpoint, {e: list(r) for e, r in url_map._rules_by_endpoint.items()},
            dict(app.view_functions), dict(app.blueprints), list(sys.modules["flshop.catalog"].bp.deferred_functions),
            {k: list(v) for k, v in app.before_request_funcs.items()})


# ------------------------------------------------------------------------------------------ routes


def test_a_route_added_by_a_push_is_served(shop):
    shop.append("flshop/views.py", '''

        @app.get("/new")
        def new():
            return "new page"
        ''')

    report = shop.push()

    assert shop.get("/new") == (200, "new page")
    assert shop.get("/") == (200, "home") and shop.get("/shop/items") == (200, "items")
    assert report.not_live == []


def test_a_route_whose_path_changed_is_served_at_the_new_path_only(shop):
    shop.edit("flshop/views.py", '@app.get("/old")', '@app.get("/renamed")')

    report = shop.push()

    assert shop.get("/renamed") == (200, "old page")
    assert shop.get("/old")[0] == 404
    assert [r.rule for r in shop.app.url_map.iter_rules("old")] == ["/renamed"]
    assert report.not_live == []


def test_a_view_changed_again_after_its_path_changed_runs_the_newest_code(shop):
    shop.edit("flshop/views.py", '@app.get("/old")', '@app.get("/renamed")')
    shop.push()
    shop.edit("flshop/views.py", 'return "old page"', 'return "renamed page"')

    shop.push()

    assert shop.get("/renamed") == (200, "renamed page")
    assert shop.app.view_functions["old"] is sys.modules["flshop.views"].old


def test_a_deleted_view_is_no_longer_served(shop):
    shop.edit("flshop/views.py", '@app.get("/old")\ndef old():\n    return "old page"\n', "")

    report = shop.push()

    assert shop.get("/old")[0] == 404
    assert "old" not in shop.app.view_functions and "old" not in shop.app.url_map._rules_by_endpoint
    assert shop.get("/") == (200, "home")
    assert report.not_live == []


def test_a_route_added_to_a_registered_blueprint_is_served_under_its_registration_prefix(shop):
    shop.append("flshop/catalog.py", '''

        @bp.get("/sale")
        def sale():
            return "sale"
        ''')

    report = shop.push()

    assert shop.get("/shop/sale") == (200, "sale")  # the url_prefix given to register_blueprint
    assert shop.get("/shop/items") == (200, "items")
    assert len(sys.modules["flshop.catalog"].bp.deferred_functions) == 2
    assert report.not_live == []


def test_a_blueprint_route_whose_path_changed_replaces_the_old_one(shop):
    shop.edit("flshop/catalog.py", '@bp.get("/items")', '@bp.get("/products")')

    shop.push()

    assert shop.get("/shop/products") == (200, "items")
    assert shop.get("/shop/items")[0] == 404
    assert len(sys.modules["flshop.catalog"].bp.deferred_functions) == 1  # a fresh start records one


def test_a_blueprint_registered_again_with_another_prefix_moves_its_routes(shop):
    shop.edit("flshop/views.py", 'url_prefix="/shop"', 'url_prefix="/store"')

    report = shop.push()

    assert shop.get("/store/items") == (200, "items")
    assert shop.get("/shop/items")[0] == 404
    assert report.not_live == []


def test_a_request_function_whose_decorators_changed_runs_once_per_request(shop):
    shop.edit("flshop/views.py", "SEEN = []", "SEEN = []\n\n\ndef traced(f):\n    return functools.wraps(f)(lambda: f())")
    shop.edit("flshop/views.py", "@app.before_request\ndef count", "@app.before_request\n@traced\ndef count")
    shop.edit("flshop/views.py", "from flask", "import functools\n\nfrom flask")
    seen = sys.modules["flshop.views"].SEEN

    shop.push()
    seen.clear()
    shop.get("/")

    assert seen == ["count"]


def test_a_failing_push_leaves_the_url_map_exactly_as_before(shop):
    before = _url_map(shop.app)
    shop.edit("flshop/views.py", '@app.get("/old")', '@app.get("/renamed")')
    shop.append("flshop/catalog.py", '''

        @bp.get("/sale")
        def sale():
            return "sale"
        ''')
    shop.append("flshop/views.py", '\n\n@app.get("/new")\ndef new():\n    return "new"\n\n\nraise RuntimeError("broken")\n')

    with pytest.raises(ActivationFailed, match="broken"):
        shop.push()

    after = _url_map(shop.app)
    assert after[0] is before[0] and after[1] is before[1]  # the very matcher and table served before
    assert after[2:] == before[2:]
    assert shop.get("/old") == (200, "old page") and shop.get("/new")[0] == 404
    assert shop.get("/shop/sale")[0] == 404
    assert "_check_setup_finished" not in vars(shop.app) and "add_url_rule" not in vars(shop.app)


# ------------------------------------------------------------------------------ templates and static


def test_a_changed_template_is_served_on_the_next_request_without_auto_reload(shop):
    assert not shop.app.config["TEMPLATES_AUTO_RELOAD"] and not shop.app.jinja_env.auto_reload
    assert shop.get("/page") == (200, "page v1 v1")  # rendered once: the template is cached
    shop.edit("flshop/templates/page.html", "v1", "v2")

    report = shop.push()

    assert shop.get("/page") == (200, "page v1 v2")
    assert shop.app.root_path == str(shop.ov.tree_root / "flshop")  # served from the pushed version
    shop.edit("flshop/templates/page.html", "v2", "v3")
    shop.push()
    assert shop.get("/page") == (200, "page v1 v3")
    assert report.not_live == []


def test_a_changed_static_file_is_served_on_the_next_request(shop):
    assert shop.get("/static/site.css") == (200, "body { color: red }")
    shop.edit("flshop/static/site.css", "red", "blue")

    shop.push()

    assert shop.get("/static/site.css") == (200, "body { color: blue }")


# ----------------------------------------------------------------------------------------- not live


def test_an_app_created_again_by_a_changed_statement_is_reported_not_live(shop):
    shop.edit("flshop/views.py", "app = Flask(__name__)", 'app = Flask(__name__, static_url_path="/assets")')
    served = shop.app

    report = shop.push()

    assert report.not_live == [{
        "source": "flask",
        "what": "flshop.views.app: the Flask app was created again by a changed statement; the server keeps "
                "serving the app it started with",
        "fix": "restart the app (changes to the app's configuration and routes go live; a change to the "
               "statement that creates the app does not)"}]
    assert report.to_dict()["not_live"] == report.not_live
    assert served.url_map.strict_slashes  # the old app is left as it was
    assert served.test_client().get("/").status_code == 200


def test_a_changed_url_map_setting_is_reported_not_live(shop):
    shop.edit("flshop/views.py", "SEEN = []", "SEEN = []\napp.url_map.strict_slashes = False")

    report = shop.push()

    assert [n["what"] for n in report.not_live] == [
        "app 'flshop.views': url_map.strict_slashes changed from True to False; the routes added before keep "
        "the old setting"]


def test_an_ordinary_push_of_a_view_and_its_template_is_live_and_reports_nothing(shop):
    shop.get("/page")
    shop.edit("flshop/views.py", 'name="v1"', 'name="v2"')
    shop.edit("flshop/templates/page.html", "page", "Page")

    report = shop.push()

    assert shop.get("/page") == (200, "Page v2 v1")
    assert report.not_live == []
