"""The official ``openai`` SDK, pointed at ``<host>/oai/v1`` with a ScaiEcho key."""

from __future__ import annotations

import pytest
from openai import AuthenticationError, OpenAI

from tenants.models import Role
from tests.transcription.test_batch_api import SPOKEN, key_with_policy
from tests.voices import synth_speech, word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def client_and_file(live_server, speech_worker, tmp_path):
    key = key_with_policy("A", "A", role=Role.TENANT_VIEWER)
    path = tmp_path / "speech.wav"
    path.write_bytes(synth_speech(SPOKEN))
    return OpenAI(base_url=f"{live_server.url}/oai/v1", api_key=key.secret, max_retries=0, timeout=120), path


def test_json_and_text(client_and_file):
    client, path = client_and_file
    with path.open("rb") as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio, language="en")
    assert word_error_rate(SPOKEN, result.text) <= 0.15
    with path.open("rb") as audio:
        text = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="text", language="en")
    assert isinstance(text, str)
    assert word_error_rate(SPOKEN, text) <= 0.15


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles(client_and_file, fmt):
    client, path = client_and_file
    with path.open("rb") as audio:
        body = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format=fmt, language="en")
    assert isinstance(body, str)
    if fmt == "vtt":
        assert body.startswith("WEBVTT")
        assert "00:00:00.000 --> " in body
    else:
        assert body.startswith("1\n00:00:00,000 --> ")
    cue_text = " ".join(line for line in body.splitlines() if line and "-->" not in line and not line.isdigit() and line != "WEBVTT")
    assert word_error_rate(SPOKEN, cue_text) <= 0.15


def test_verbose_json_with_segment_and_word_timestamps(client_and_file):
    client, path = client_and_file
    with path.open("rb") as audio:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=audio, response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
    assert result.language == "english"
    assert result.duration > 5
    assert word_error_rate(SPOKEN, result.text) <= 0.15
    assert result.segments
    assert result.words
    starts = [word.start for word in result.words]
    assert starts == sorted(starts)
    assert all(0 <= word.start <= word.end <= result.duration + 0.01 for word in result.words)
    assert {w.word.strip(".,").lower() for w in result.words} >= {"budget", "report", "friday"}


def test_bad_key_is_an_authentication_error(live_server, tmp_path):
    path = tmp_path / "s.wav"
    path.write_bytes(synth_speech("hello"))
    client = OpenAI(base_url=f"{live_server.url}/oai/v1", api_key="sgk_" + "x" * 43, max_retries=0)
    with pytest.raises(AuthenticationError), path.open("rb") as audio:
        client.audio.transcriptions.create(model="whisper-1", file=audio)
