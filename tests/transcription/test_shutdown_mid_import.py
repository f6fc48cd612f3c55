"""A worker stopped (SIGTERM) while its job was importing a library hands the job back.

Celery raises ``SystemExit`` in the task at a warm stop. When that lands inside an import — as it
did for faster-whisper's VAD importing onnxruntime — the library reports its own error ("requires
the onnxruntime package") with the exit as its cause. The job must go back to the broker as at any
other stop, not end ``failed`` with "internal error". The stop is injected at the engine's call
(the real signal's timing cannot be hit on purpose); everything else is the real job path.
"""

from __future__ import annotations

from typing import Any

import pytest

from speech.engines.ctranslate2 import CTranslate2Engine
from tests.transcription.test_batch_api import SPOKEN, TRANSCRIBE_URL, key_with_policy, upload
from tests.voices import synth_speech
from transcription.models import TranscriptionJob
from transcription.services import job_run, worker_claimant, worker_heartbeat

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

NODE = "stopping@host"


def test_a_stop_inside_an_import_hands_the_job_back_instead_of_failing_it(api, jobs_nobody_takes, monkeypatch) -> None:
    def stopped_while_importing(self: Any, samples: Any, *, options: Any) -> Any:
        try:
            raise SystemExit(-241)  # what billiard raises in a pool process at SIGTERM
        except SystemExit as stop:
            try:
                raise ImportError("initialization failed") from stop
            except ImportError as failed:
                raise RuntimeError("Applying the VAD filter requires the onnxruntime package") from failed

    monkeypatch.setattr(CTranslate2Engine, "transcribe", stopped_while_importing)
    key = key_with_policy("A", "A")
    worker_heartbeat(worker_id=worker_claimant(node=NODE))
    form = {"file": upload("speech.wav", synth_speech(SPOKEN)), "language_hint": "en", "force_async": "true"}
    response = api.post(TRANSCRIBE_URL, form, format="multipart", headers=key.headers)
    assert response.status_code == 202, response.json()
    job_id = response.json()["data"]["job_id"]

    with pytest.raises(SystemExit):
        job_run(job_id=job_id, worker_id=worker_claimant(node=NODE), retries_left=True)

    job = TranscriptionJob.objects.get(pk=job_id)
    assert job.status == TranscriptionJob.Status.RUNNING, job.status_reason  # still held, for redelivery
