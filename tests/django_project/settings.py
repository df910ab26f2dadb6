"""A small Django project for pgslots.django's tests: views under limit_view, a task of Django's
tasks framework under limited, and manage.py pgslots. The database is PGSLOTS_DSN."""

from __future__ import annotations

import os

SECRET_KEY = "pgslots-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
INSTALLED_APPS = ["pgslots.django", "django_tasks"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "django_project.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
PGSLOTS = {"DSN": os.environ["PGSLOTS_DSN"]} if os.environ.get("PGSLOTS_DSN") else {}
TASKS = {"default": {"BACKEND": "django_tasks.backends.immediate.ImmediateBackend"}}
USE_TZ = True
