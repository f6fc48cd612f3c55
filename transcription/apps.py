from django.apps import AppConfig


class TranscriptionConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "transcription"

    def ready(self) -> None:
        from celery.signals import worker_ready

        from speakers.services import erasure_hook_register
        from transcription import worker  # noqa: F401  (the Celery worker's heartbeat, stale-job sweep, model preload)
        from transcription.services import jobs_forget_speaker
        from transcription.storage import staged_orphans_sweep_on_start

        # An erased speaker's name and id leave the stored diarized transcripts too.
        erasure_hook_register(jobs_forget_speaker)
        # Staged uploads a crashed web process (or worker) left behind go when a worker starts.
        worker_ready.connect(staged_orphans_sweep_on_start, weak=False, dispatch_uid="scaiecho-staged-orphans-sweep")
