"""One Django push scenario in a fresh interpreter (Django can be set up once per process).

Run as ``python django_scenario.py ROOT SCENARIO``: ``ROOT/app`` holds the ``shopapp`` project the
app imports from disk, ``ROOT/dev`` the developer's copy the scenario edits and pushes. habanero is
installed first, serving ``shopapp`` (its settings included), then Django is set up on an
in-memory database with the app's tables. ``SCENARIO`` is Python run with these names:

* ``edit(path, old, new)``, ``write(path, text)``, ``delete(path)``: change the developer's copy;
* ``push()``: build a signed bundle of it and apply it, returning the report as a dict (or
  ``{"error": ...}`` when the push failed);
* ``get(path)``: a request through Django's test client, ``(status, body text)``;
* ``warned``: the messages of every warning raised so far;
* ``result``: a dict the scenario fills, printed as JSON on the last line of the output.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path: its overlay.py would shadow the package.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

ROOT = Path(sys.argv[1])
SCENARIO = Path(sys.argv[2]).read_text(encoding="utf-8")
APP, DEV = ROOT / "app", ROOT / "dev"
MARK = "SCENARIO RESULT: "


def main() -> None:
    sys.path.insert(0, str(APP))
    os.environ["DJANGO_SETTINGS_MODULE"] = "shopapp.settings"
    import overlay
    from overlay.bundle import build_bundle
    from overlay.errors import HabaneroError
    from overlay.keys import generate_signing_key
    from support.overlay import tree_entries

    key = generate_signing_key(ROOT / "keys" / "deploy", comment="django@habanero")
    trusted = ROOT / "keys" / "trusted_keys"
    trusted.write_text(key.public.line() + "\n", encoding="utf-8")
    ov = overlay.install(packages=["shopapp"], trusted_keys=str(trusted), store=str(ROOT / "store"))

    warned: list[str] = []
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, *args, **kw: warned.append(str(message))

    import django

    django.setup()
    from django.apps import apps
    from django.db import connection
    from django.test import Client

    with connection.schema_editor() as editor:
        for model in apps.get_app_config("shopapp").get_models():
            editor.create_model(model)

    def path_of(rel: str) -> Path:
        return DEV / "shopapp" / rel

    def edit(rel: str, old: str, new: str) -> None:
        text = path_of(rel).read_text(encoding="utf-8")
        assert old in text, f"{old!r} is not in {rel}"
        path_of(rel).write_text(text.replace(old, new, 1), encoding="utf-8")

    def write(rel: str, text: str) -> None:
        path_of(rel).parent.mkdir(parents=True, exist_ok=True)
        path_of(rel).write_text(text, encoding="utf-8")

    def delete(rel: str) -> None:
        path_of(rel).unlink()

    def push() -> dict[str, Any]:
        files = tree_entries(DEV / "shopapp", DEV)
        bundle = build_bundle(files, app_id="shopapp", version=ov.store.highest + 1, signers=[key])
        try:
            return ov.apply(bundle).to_dict()
        except HabaneroError as exc:
            return {"error": str(exc)}

    client = Client()

    def get(path: str) -> tuple[int, str]:
        response = client.get(path)
        return response.status_code, response.content.decode("utf-8")

    result: dict[str, Any] = {}
    exec(compile(SCENARIO, "scenario", "exec"), {"edit": edit, "write": write, "delete": delete, "push": push,
                                                  "get": get, "warned": warned, "result": result})
    print(MARK + json.dumps(result, default=repr), flush=True)


if __name__ == "__main__":
    main()
