"""The Django app: ``"pgslots.django"`` in ``INSTALLED_APPS`` configures pgslots' default client from
the ``PGSLOTS`` setting when Django starts, and adds ``manage.py pgslots``."""

from __future__ import annotations

from django.apps import AppConfig


class PgSlotsConfig(AppConfig):  # type: ignore[misc]
    name = "pgslots.django"
    label = "pgslots"
    verbose_name = "pgslots"

    def ready(self) -> None:
        from . import configure_from_settings

        configure_from_settings()
