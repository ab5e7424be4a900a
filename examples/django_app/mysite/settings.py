"""Settings. ``overlay.install()`` runs first, before Django imports the apps it serves."""

import os
from pathlib import Path

import overlay

BASE_DIR = Path(__file__).resolve().parent.parent

ov = overlay.install(
    packages=["polls"],
    trusted_keys=os.environ.get("HABANERO_TRUSTED_KEYS", str(BASE_DIR / "trusted_keys")),
    store=os.environ.get("HABANERO_STORE", str(BASE_DIR / ".habanero" / "store")),
)

SECRET_KEY = "not-a-secret: an example"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["polls"]
ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"
DATABASES: dict = {}
USE_TZ = True
