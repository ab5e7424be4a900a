"""The entry point: habanero first, then Django (``gunicorn wsgi -w 4``; ``manage.py`` imports it too).

``install()`` runs before Django imports the settings, so habanero serves the whole project,
``mysite`` (settings, URLconf) and ``polls`` (models, views, templates): a push reaches all of it.
This file is the one part that is not pushed: it stays on disk, like ``manage.py``.
"""

import os
from pathlib import Path

import overlay

BASE_DIR = Path(__file__).resolve().parent
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

ov = overlay.install(
    packages=["mysite", "polls"],
    trusted_keys=os.environ.get("HABANERO_TRUSTED_KEYS", str(BASE_DIR / "trusted_keys")),
    store=os.environ.get("HABANERO_STORE", str(BASE_DIR / ".habanero" / "store")),
)

from django.core.wsgi import get_wsgi_application  # noqa: E402  (after install(): Django imports the app)

application = ov.wsgi(get_wsgi_application())
