"""Settings. Served by habanero like the rest of the project, but Django reads them once, at
start-up: a push that changes one is listed in its report as NOT LIVE, and the restart applies it."""

import os
from pathlib import Path

# The project's directory on disk, named by wsgi.py: once a version is pushed this file runs from
# habanero's source tree, so the data (the database) is not found next to __file__.
BASE_DIR = Path(os.environ.get("MYSITE_DIR", Path(__file__).resolve().parent.parent))

SECRET_KEY = "not-a-secret: an example"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["polls"]
ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "wsgi.application"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
TIME_ZONE = "UTC"
USE_TZ = True
