"""Settings. Served by habanero like the rest of the project, but Django reads them once, at
start-up: a push that changes one is listed in its report as NOT LIVE, and the restart applies it."""

from pathlib import Path

# Django's own line. Once a version is pushed this file runs from habanero's source tree, whose root
# links to this project's files (db.sqlite3, media/, .env): BASE_DIR / "db.sqlite3" is the same file.
BASE_DIR = Path(__file__).resolve().parent.parent

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
