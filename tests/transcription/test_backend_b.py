"""Backend B over real HTTP: the worker calls a local OpenAI-protocol relay, whose success path
forwards to this service's own ``/oai/v1`` endpoint on a second live server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tenants.models import Role, TenantPolicy, UsageRecord
from tests.factories import KeyFactory
from tests.relay_server import DEFAULT_VERBOSE_JSON, RelayServer
from tests.tenants.test_auth import assert_error
from tests.transcription.test_batch_api import SPOKEN, TRANSCRIBE_URL, key_with_policy, upload
from tests.voices import synth_speech, word_error_rate
from tests.workers import RELAY_KEY

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def relay_reset(relay: RelayServer, settings) -> Iterator[RelayServer]:
    """The relay as the worker sees it, configured in this (web) process too."""
    settings.SCAIECHO_RELAY_BASE_URL = relay.base_url
    settings.SCAIECHO_RELAY_API_KEY = RELAY_KEY
    relay.requests.clear()
    yield relay
    relay.mode = "static"
    relay.static_body = DEFAULT_VERBOSE_JSON


@pytest.fixture(scope="module")
def speech_wav() -> bytes:
    return synth_speech(SPOKEN)


def post(api, key, wav: bytes, **fields: str):
    return api.post(TRANSCRIBE_URL, {"file": upload("speech.wav", wav), **fields}, format="multipart", headers=key.headers)


def test_relay_transcribes_through_an_openai_compatible_server(api, live_server, speech_worker, relay_reset, speech_wav):
    upstream = KeyFactory.issue(role=Role.TENANT_VIEWER)
    TenantPolicy.objects.create(tenant=upstream.tenant, allowed_backends="A", default_backend="A")
    relay_reset.mode = "forward"
    relay_reset.forward_base_url = f"{live_server.url}/oai/v1"
    relay_reset.forward_key = upstream.secret
    key = key_with_policy("B", "B")
    response = post(api, key, speech_wav, language_hint="en")
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["backend_used"] == "B"
    assert word_error_rate(SPOKEN, data["transcript"]) <= 0.15, data["transcript"]
    assert data["language_detected"] == "en"
    assert data["segments"]
    sent = relay_reset.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {RELAY_KEY}"
    assert sent.fields["model"] == ["whisper-1"]
    assert sent.fields["language"] == ["en"]
    assert sent.file_size == len(speech_wav)
    assert RELAY_KEY not in response.content.decode()
    assert UsageRecord.objects.get(reference=data["job_id"]).backend == "B"


@pytest.mark.parametrize(
    ("preference", "backend"),
    [("any", "B"), ("prefer_relay", "B"), ("prefer_self_hosted", "A")],
)
def test_policy_routes_between_a_and_b(api, speech_worker, relay_reset, speech_wav, preference, backend):
    key = key_with_policy("AB", "B")
    data = post(api, key, speech_wav, language_hint="en", backend_preference=preference).json()["data"]
    assert data["backend_used"] == backend
    if backend == "B":  # the relay answered its canned transcript
        assert data["transcript"] == DEFAULT_VERBOSE_JSON["text"]
    else:
        assert word_error_rate(SPOKEN, data["transcript"]) <= 0.15


def test_preference_never_widens_the_allowed_set(api, speech_worker, relay_reset, speech_wav):
    key = key_with_policy("A", "A")
    data = post(api, key, speech_wav, language_hint="en", backend_preference="prefer_relay").json()["data"]
    assert data["backend_used"] == "A"
    assert relay_reset.requests == []


@pytest.mark.parametrize(
    ("mode", "settings_", "status", "code"),
    [
        ("hang", {"hang_s": 60}, 504, "BACKEND_TIMEOUT"),
        ("ratelimit", {"retry_after": 1}, 429, "BACKEND_RATE_LIMITED"),
        ("error", {"error_status": 503}, 502, "BACKEND_ERROR"),
        ("error", {"error_status": 500}, 502, "BACKEND_ERROR"),
        ("badshape", {}, 502, "UPSTREAM_SHAPE_MISMATCH"),
        ("notext", {}, 502, "UPSTREAM_SHAPE_MISMATCH"),
    ],
)
def test_relay_failures_map_to_backend_errors(api, speech_worker, relay_reset, speech_wav, mode, settings_, status, code):
    relay_reset.mode = mode
    for name, value in settings_.items():
        setattr(relay_reset, name, value)
    key = key_with_policy("B", "B")
    response = post(api, key, speech_wav)
    body = assert_error(response, status, code)
    assert RELAY_KEY not in response.content.decode()
    job_id = api.get(f"{TRANSCRIBE_URL}/jobs/{_last_job_id(key)}", headers=key.headers).json()["data"]
    assert job_id["status"] == "failed"
    assert not UsageRecord.objects.filter(tenant=key.tenant).exists()
    transient = mode in ("hang", "ratelimit", "error")
    # Transient failures are retried once (SCAIECHO_JOB_MAX_RETRIES=1 for the test worker).
    assert len(relay_reset.requests) == (2 if transient else 1), body


def _last_job_id(key) -> str:
    from transcription.models import TranscriptionJob

    return str(TranscriptionJob.objects.filter(tenant=key.tenant).latest("created_at").id)
