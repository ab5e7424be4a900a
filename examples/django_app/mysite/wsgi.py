"""WSGI entry point: habanero's routes in front of Django's, on its port (runserver, gunicorn)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

django_app = get_wsgi_application()

from mysite.settings import ov  # noqa: E402

application = ov.wsgi(django_app)
