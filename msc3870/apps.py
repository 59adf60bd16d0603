from django.apps import AppConfig


class MSC3870Config(AppConfig):
    name = "msc3870"
    verbose_name = "Matrix media (MSC3870)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.apps import apps
        from django.db.models.signals import post_migrate

        from . import checks  # noqa: F401 - registers the system checks

        if apps.is_installed("django_celery_beat"):
            # After the beat tables exist; only missing entries are created.
            post_migrate.connect(
                _install_schedule_after_beat_migrations, dispatch_uid="msc3870_schedule"
            )


def _install_schedule_after_beat_migrations(sender: AppConfig, **kwargs: object) -> None:
    if sender.label == "django_celery_beat":
        from .schedule import install_default_schedule

        install_default_schedule()
