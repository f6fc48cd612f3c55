from django.apps import AppConfig


class SpeakersConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "speakers"

    def ready(self) -> None:
        from speakers import checks  # noqa: F401  (registers the system checks)
