"""The Django integration (``overlay.integrations.django``): URLconf, templates, models, settings.

Django sets itself up once per process, so each scenario runs in a fresh interpreter
(``support/django_scenario.py``): habanero serves the ``shopapp`` project of
``snippets/django/`` (settings, models, views, URLs, a template and a tag library), the scenario
edits a copy, pushes it through ``Overlay.apply`` on a real store and reads back what Django
serves and holds. Each scenario returns what it saw; the assertions are here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, TESTS

pytestmark = pytest.mark.slow  # a fresh interpreter per scenario: Django can be set up once per process

SNIPPET = Path(__file__).parent / "snippets" / "django"
RUNNER = TESTS / "support" / "django_scenario.py"
MARK = "SCENARIO RESULT: "


def scenario(tmp_path: Path, *code: str) -> dict[str, Any]:
    """Run the ``code`` blocks against a freshly set-up ``shopapp`` (see ``support/django_scenario.py``)."""
    for side in ("app", "dev"):
        shutil.copytree(SNIPPET, tmp_path / side, ignore=shutil.ignore_patterns("__pycache__"))
    script = tmp_path / "scenario.py"
    script.write_text("\n".join(textwrap.dedent(block) for block in code), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HABANERO_", "DJANGO_"))
           or k == "HABANERO_RUNTIME_DIR"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(RUNNER), str(tmp_path), str(script)], capture_output=True,
                          text=True, timeout=60, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert lines, output
    return json.loads(lines[-1][len(MARK):])


def not_live(report: dict[str, Any]) -> list[str]:
    return [f"{n['source']}: {n['what']}; {n['fix']}" for n in report["not_live"]]


# ---------------------------------------------------------------------------------------- URLconf


def test_a_new_url_is_served_a_removed_one_404s_and_a_changed_one_moves(tmp_path):
    seen = scenario(tmp_path, """
        from shopapp.models import Product
        pk = Product.objects.create(name="tea").pk
        result["before"] = [get("/")[0], get("/about/")[0], get(f"/products/{pk}/")[0], get(f"/items/{pk}/")[0]]
        write("views.py", open("dev/shopapp/views.py").read() + "\\n\\ndef about(request):\\n    return HttpResponse('about us')\\n")
        edit("site_urls.py", 'path("", views.index),', 'path("about/", views.about),')
        edit("site_urls.py", '"products/<int:pk>/"', '"items/<int:pk>/"')
        result["report"] = push()
        result["after"] = [get("/")[0], get("/about/"), get(f"/products/{pk}/")[0], get(f"/items/{pk}/")[0]]
    """)

    assert seen["before"] == [200, 404, 200, 404]
    assert "error" not in seen["report"], seen["report"]
    assert seen["after"] == [404, [200, "about us"], 404, 200]


# -------------------------------------------------------------------------------------- templates


def test_a_template_and_a_tag_library_change_are_served_past_the_cached_loader(tmp_path):
    seen = scenario(tmp_path, """
        from shopapp.models import Product
        pk = Product.objects.create(name="tea").pk
        result["before"] = get(f"/products/{pk}/")
        edit("templates/shopapp/product.html", "<h1>", "<h1 class='new'>")
        result["template"] = (push().get("error"), get(f"/products/{pk}/"))
        edit("templatetags/shop_tags.py", 'return f"{value}!"', 'return f"{value}!!!"')
        result["tags"] = (push().get("error"), get(f"/products/{pk}/"))
    """)

    assert seen["before"] == [200, "<h1>product tea!</h1>\n"]
    assert seen["template"] == [None, [200, "<h1 class='new'>product tea!</h1>\n"]]
    assert seen["tags"] == [None, [200, "<h1 class='new'>product tea!!!</h1>\n"]]


# ----------------------------------------------------------------------------------------- models

MODEL_CHECKS = """
    from django.apps import apps
    from shopapp import models
    P = models.Product
    result["checks"] = {
        "module binds the live class": models.Product is Product,
        "registry": apps.get_model("shopapp", "Product") is Product,
        "all_models": apps.all_models["shopapp"]["product"] is Product,
        "app config": apps.get_app_config("shopapp").models["product"] is Product,
        "get_models": Product in apps.get_models(),
        "_meta kept": Product._meta is meta,
        "_meta.model": Product._meta.model is Product,
        "fields' model": all(f.model is Product for f in Product._meta.get_fields() if hasattr(f, "model") and not f.auto_created),
        "manager's model": Product.objects.model is Product,
        "DoesNotExist kept": Product.DoesNotExist is does_not_exist,
        "old instance": isinstance(tea, Product),
        "loaded instance": type(Product.objects.get(pk=tea.pk)) is Product,
        "reverse accessor": type(drinks.product_set.get()) is Product,
        "related field's model": Category._meta.get_field("product").related_model is Product,
    }
"""


def test_a_model_method_change_patches_the_class_in_place_with_its_registry_and_instances(tmp_path):
    seen = scenario(tmp_path, """
        from shopapp.models import Category, Product
        meta, does_not_exist = Product._meta, Product.DoesNotExist
        drinks = Category.objects.create(name="drinks")
        tea = Product.objects.create(name="tea", category=drinks)
        Product.objects.create(name="coffee")
        result["order before"] = [p.name for p in Product.objects.all()]
        edit("models.py", 'return f"product {self.name}"', 'return f"item {self.name}"')
        edit("models.py", 'ordering = ["name"]', 'ordering = ["-name"]')
        result["report"] = push()
        result["label"] = tea.label()
        result["page"] = get(f"/products/{tea.pk}/")
        result["order after"] = [p.name for p in Product.objects.all()]
        result["warned"] = [w for w in warned if "already registered" in w]
    """, MODEL_CHECKS)

    assert "error" not in seen["report"], seen["report"]
    assert seen["checks"] == dict.fromkeys(seen["checks"], True)
    assert seen["label"] == "item tea" and seen["page"] == [200, "<h1>item tea!</h1>\n"]
    assert seen["order before"] == ["coffee", "tea"] and seen["order after"] == ["tea", "coffee"]
    assert seen["warned"] == []
    assert seen["report"]["not_live"] == []


def test_a_model_field_change_is_reported_not_live_and_the_live_class_keeps_its_fields(tmp_path):
    seen = scenario(tmp_path, """
        from shopapp.models import Category, Product
        meta, does_not_exist = Product._meta, Product.DoesNotExist
        drinks = Category.objects.create(name="drinks")
        tea = Product.objects.create(name="tea", category=drinks)
        edit("models.py", "name = models.CharField(max_length=40)\\n    category",
             "name = models.CharField(max_length=80)\\n    price = models.IntegerField(default=0)\\n    category")
        edit("models.py", 'return f"product {self.name}"', 'return f"item {self.name}"')
        result["report"] = push()
        result["fields"] = [f.name for f in Product._meta.concrete_fields]
        result["has price"] = hasattr(Product, "price")
        result["saved"] = Product.objects.create(name="milk").label()
    """, MODEL_CHECKS)

    assert "error" not in seen["report"], seen["report"]
    assert not_live(seen["report"]) == [
        "django: shopapp.Product: fields changed (price added, name changed); "
        "run makemigrations and migrate, then restart the app"]
    assert seen["fields"] == ["id", "name", "category"] and seen["has price"] is False
    assert seen["saved"] == "item milk"  # the method change in the same push is live
    assert seen["checks"] == dict.fromkeys(seen["checks"], True)


def test_a_failed_push_leaves_the_urls_the_registry_and_the_model_classes_as_they_were(tmp_path):
    seen = scenario(tmp_path, """
        import warnings
        from overlay.integrations import register
        from shopapp.models import Category, Product
        meta, does_not_exist = Product._meta, Product.DoesNotExist
        reverse = Category.__dict__["product_set"]
        drinks = Category.objects.create(name="drinks")
        tea = Product.objects.create(name="tea", category=drinks)
        filters = list(warnings.filters)

        def fail(push):
            raise RuntimeError("the push after Django's hook")

        register("fail", after=fail)
        write("views.py", open("dev/shopapp/views.py").read() + "\\n\\ndef about(request):\\n    return HttpResponse('about us')\\n")
        edit("site_urls.py", 'path("", views.index),', 'path("", views.index),\\n    path("about/", views.about),')
        edit("models.py", 'return f"product {self.name}"', 'return f"item {self.name}"')
        result["push"] = push()
        result["about"] = get("/about/")[0]
        result["label"] = tea.label()
        result["reverse kept"] = Category.__dict__["product_set"] is reverse
        result["filters kept"] = warnings.filters == filters
    """, MODEL_CHECKS)

    assert "the 'fail' hook (after the push) raised RuntimeError" in seen["push"]["error"]
    assert seen["about"] == 404 and seen["label"] == "product tea"
    assert seen["reverse kept"] and seen["filters kept"]
    assert seen["checks"] == dict.fromkeys(seen["checks"], True)


# --------------------------------------------------------------------------------------- settings


def test_a_settings_change_is_reported_as_needing_a_restart_and_django_keeps_the_old_value(tmp_path):
    seen = scenario(tmp_path, """
        import sys
        from django.conf import settings
        edit("settings.py", "DEBUG = False", "DEBUG = True")
        write("settings.py", open("dev/shopapp/settings.py").read() + 'SHOP_NAME = "Tea & co"\\n')
        result["report"] = push()
        result["django"] = settings.DEBUG
        result["module"] = sys.modules["shopapp.settings"].DEBUG
    """)

    assert not_live(seen["report"]) == [
        "django: settings.DEBUG changed; Django read it at start-up; restart the app to apply it",
        "django: settings.SHOP_NAME added; Django reads settings at start-up; restart the app to apply it",
    ]
    assert seen["django"] is False and seen["module"] is True  # the restart reads the new value
