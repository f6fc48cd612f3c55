"""num_speakers / min_speakers / max_speakers on POST /transcribe and the OpenAI-compatible
endpoint: validated (422 with the field), stored on the job, documented in the schema."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.tenants.test_auth import assert_error
from tests.voices import silence_wav
from transcription.models import TranscriptionJob

pytestmark = pytest.mark.django_db
TRANSCRIBE_URL = "/v1/modules/scaiecho/transcribe"
OAI_URL = "/oai/v1/audio/transcriptions"


def form(**fields):
    return {"file": SimpleUploadedFile("a.wav", silence_wav(seconds=1.0)), **fields}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"diarize": "true", "num_speakers": "2", "min_speakers": "1"}, "min_speakers"),
        ({"diarize": "true", "min_speakers": "3", "max_speakers": "2"}, "min_speakers"),
        ({"diarize": "true", "num_speakers": "21"}, "num_speakers"),
        ({"diarize": "true", "max_speakers": "0"}, "max_speakers"),
        ({"num_speakers": "2"}, "num_speakers"),  # without diarization
        ({"diarize": "true", "num_speakers": "2.0"}, "num_speakers"),  # DRF's IntegerField took it as 2
        ({"diarize": "true", "min_speakers": "1.0", "max_speakers": "3"}, "min_speakers"),
    ],
)
def test_bad_speaker_counts_are_422_with_the_field(api, admin_key, fields, field):
    response = api.post(TRANSCRIBE_URL, form(**fields), format="multipart", headers=admin_key.headers)
    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert field in {d["field"] for d in body["error"]["details"]}, body


def test_speaker_counts_are_stored_on_the_job(api, admin_key):
    fields = {"diarize": "true", "min_speakers": "2", "max_speakers": "4", "force_async": "true"}
    response = api.post(TRANSCRIBE_URL, form(**fields), format="multipart", headers=admin_key.headers)
    assert response.status_code == 202, response.content
    job = TranscriptionJob.objects.get(pk=response.json()["data"]["job_id"])
    assert (job.num_speakers, job.min_speakers, job.max_speakers) == (None, 2, 4)


def test_openai_endpoint_takes_counts_only_with_diarized_json(api, admin_key):
    response = api.post(OAI_URL, form(response_format="json", num_speakers="2"), format="multipart", headers=admin_key.headers)
    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert "num_speakers" in {d["field"] for d in body["error"]["details"]}


def test_the_schema_documents_the_counts(client):
    schema = client.get("/v1/modules/scaiecho/openapi.json").json()
    for path in (TRANSCRIBE_URL, OAI_URL):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        ref = body["$ref"].rsplit("/", 1)[-1]
        assert {"num_speakers", "min_speakers", "max_speakers"} <= set(schema["components"]["schemas"][ref]["properties"])
