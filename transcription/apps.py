from django.apps import AppConfig


class TranscriptionConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "transcription"

    def ready(self) -> None:
        # The Celery worker's signal handlers: heartbeat, stale-job sweep, model preload.
        from transcription import worker  # noqa: F401
