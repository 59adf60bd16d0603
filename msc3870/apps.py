from django.apps import AppConfig


class MSC3870Config(AppConfig):
    name = "msc3870"
    verbose_name = "Matrix media (MSC3870)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks
