#!/usr/bin/env python
"""Django's command line for this project (``python manage.py runserver``, ``migrate``...)."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    import wsgi  # noqa: F401  habanero first, so that the settings and the apps come from the active bundle
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
