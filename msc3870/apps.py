from django.apps import AppConfig


class MSC3870Config(AppConfig):
    name = "msc3870"
    verbose_name = "Matrix media (MSC3870)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.apps import apps
        from django.core.checks import Tags, register
        from django.db.models.signals import post_migrate

        from . import checks, tasks  # noqa: F401 - tasks registers them, by name (msc3870.queue)

        register(checks.check_settings, Tags.compatibility)
        register(checks.check_setting_types, Tags.compatibility)
        # Settings a misread would weaken (a content-type allowlist given as a string).
        register(checks.check_security_setting_types, Tags.security)
        register(checks.check_url_previews, Tags.security)

        if apps.is_installed("django_celery_beat"):
            # After the beat tables exist; only missing entries are created.
            post_migrate.connect(
                _install_schedule_after_beat_migrations, dispatch_uid="msc3870_schedule"
            )


def _install_schedule_after_beat_migrations(sender: AppConfig, **kwargs: object) -> None:
    if sender.label == "django_celery_beat":
        from .schedule import install_default_schedule

        install_default_schedule()
