"""The request option that turns VAD-segmented decoding off (for comparison): ``vad_segmentation``
on ``/transcribe``, and OpenAI's ``chunking_strategy`` plus our ``vad_segmentation`` on the
OpenAI-compatible endpoint. Stored on the job, which hands it to the engine."""

from __future__ import annotations

import pytest
from openai import OpenAI, UnprocessableEntityError

from tenants.models import Role
from tests.transcription.test_batch_api import SPOKEN, TRANSCRIBE_URL, key_with_policy, upload
from tests.voices import synth_speech, word_error_rate
from transcription.models import TranscriptionJob

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize(("sent", "stored"), [(None, True), ("false", False), ("true", True)])
def test_rest_vad_segmentation_is_stored_on_the_job(api, jobs_nobody_takes, sent, stored):
    key = key_with_policy("A", "A")
    form = {"file": upload("s.wav", synth_speech(SPOKEN)), "force_async": "true"}
    if sent is not None:
        form["vad_segmentation"] = sent

    response = api.post(TRANSCRIBE_URL, form, format="multipart", headers=key.headers)

    assert response.status_code == 202, response.json()
    assert TranscriptionJob.objects.get(pk=response.json()["data"]["job_id"]).vad_segmentation is stored


def test_rest_vad_segmentation_must_be_a_boolean(api):
    key = key_with_policy("A", "A")
    form = {"file": upload("s.wav", synth_speech(SPOKEN)), "vad_segmentation": "sometimes"}

    response = api.post(TRANSCRIBE_URL, form, format="multipart", headers=key.headers)

    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "vad_segmentation"


def test_openai_chunking_strategy_and_vad_segmentation(live_server, speech_worker, tmp_path):
    key = key_with_policy("A", "A", role=Role.TENANT_VIEWER)
    path = tmp_path / "speech.wav"
    path.write_bytes(synth_speech(SPOKEN))
    client = OpenAI(base_url=f"{live_server.url}/oai/v1", api_key=key.secret, max_retries=0, timeout=120)

    with path.open("rb") as audio:
        vad = client.audio.transcriptions.create(
            model="whisper-1", file=audio, language="en", chunking_strategy={"type": "server_vad", "threshold": 0.5}
        )
    with path.open("rb") as audio:
        whole = client.audio.transcriptions.create(
            model="whisper-1", file=audio, language="en", extra_body={"vad_segmentation": "false"}
        )
    with path.open("rb") as audio, pytest.raises(UnprocessableEntityError):
        client.audio.transcriptions.create(
            model="whisper-1", file=audio, chunking_strategy="auto", extra_body={"vad_segmentation": "false"}
        )

    jobs = list(TranscriptionJob.objects.filter(tenant=key.tenant).order_by("created_at"))
    assert [job.vad_segmentation for job in jobs] == [True, False]
    assert word_error_rate(SPOKEN, vad.text) <= 0.15
    assert word_error_rate(SPOKEN, whole.text) <= 0.15
