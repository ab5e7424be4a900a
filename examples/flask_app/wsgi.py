"""The app's entry point: `gunicorn wsgi:app -w 4`, `flask --app wsgi:app run --debug`, any WSGI server.

It sits outside the `shop` package, so that `install()` runs before anything of `shop` is imported;
every worker runs these lines, and every worker takes part in every push.
"""

import os
import sys
from pathlib import Path

import overlay

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the code on disk, used until the first push

ov = overlay.install(
    packages=["shop"],
    trusted_keys=os.environ.get("HABANERO_TRUSTED_KEYS", str(HERE / "trusted_keys")),
    store=os.environ.get("HABANERO_STORE", str(HERE / ".habanero" / "store")),
)

from shop.views import app  # noqa: E402  (after install: served from the active bundle)

app.wsgi_app = ov.wsgi(app.wsgi_app)  # Flask's own way to add WSGI middleware: /_habanero/ on its port
