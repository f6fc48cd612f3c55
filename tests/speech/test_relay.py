"""Backend B against a real local relay server: what a job sees when the relay answers, refuses,
stalls, throttles or talks nonsense. No database; the relay is ``tests.relay_server``."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import numpy as np
import pytest

from scaiecho_site.errors import BackendError, BackendRateLimited, BackendTimeout, UpstreamShapeMismatch
from speech.audio import SAMPLE_RATE
from speech.engines.base import EncodedAudio, TranscribeOptions
from speech.engines.relay import RelayClient, RelayRejected
from tests.drip_server import dripping_server
from tests.relay_server import RelayServer

KEY = "relay-secret-5b1f0c9e77"
AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64)


@pytest.fixture
def relay() -> Iterator[RelayServer]:
    with RelayServer(api_key=KEY) as server:
        yield server


def seconds_of_samples(seconds: float) -> np.ndarray:
    """Samples of the given length: what the relay reports as the duration, whatever it hears."""
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def client_for(relay: RelayServer, *, api_key: str = KEY, timeout_s: float = 5.0) -> RelayClient:
    return RelayClient(base_url=relay.base_url, api_key=api_key, model="whisper-1", timeout_s=timeout_s)


def test_verbose_json_becomes_segments_with_their_words_and_an_iso_language(relay: RelayServer) -> None:
    result = client_for(relay).transcribe(
        seconds_of_samples(4.2),
        options=TranscribeOptions(original=EncodedAudio(AUDIO, "talk.wav"), word_timestamps=True),
    )

    assert result.text == "Hello there. General Kenobi."
    assert result.language == "en"  # the relay said "english"
    assert result.duration_s == 4.2  # our measurement, not the relay's 4.0
    assert [(s.start, s.end, s.text) for s in result.segments] == [
        (0.0, 1.8, "Hello there."),
        (2.0, 4.0, "General Kenobi."),
    ]
    assert [[w.word for w in s.words or []] for s in result.segments] == [["Hello", "there."], ["General", "Kenobi."]]
    assert result.segments[1].words is not None
    assert (result.segments[1].words[0].start, result.segments[1].words[0].end) == (2.0, 2.9)
    assert result.segments[0].speaker_id is None


def test_words_are_left_out_unless_asked_for(relay: RelayServer) -> None:
    result = client_for(relay).transcribe(
        seconds_of_samples(4.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "talk.wav"))
    )

    assert all(s.words is None for s in result.segments)


def test_the_request_carries_model_options_file_and_bearer_key(relay: RelayServer) -> None:
    client = RelayClient(base_url=relay.base_url + "/", api_key=KEY, model="whisper-large-v3", timeout_s=5)

    client.transcribe(
        seconds_of_samples(4.0),
        options=TranscribeOptions(
            original=EncodedAudio(AUDIO, "talk.wav"),
            language="German",
            temperature=0.2,
            word_timestamps=True,
            prompt="ScaiEcho, Kenobi",
        ),
    )

    (sent,) = relay.requests
    assert sent.path == "/v1/audio/transcriptions"  # the trailing slash of base_url was tolerated
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.fields["model"] == ["whisper-large-v3"]
    assert sent.fields["response_format"] == ["verbose_json"]
    assert sent.fields["timestamp_granularities[]"] == ["segment", "word"]
    assert sent.fields["language"] == ["de"]
    assert sent.fields["temperature"] == ["0.2"]
    assert sent.fields["prompt"] == ["ScaiEcho, Kenobi"]
    assert (sent.file_name, sent.file_size) == ("talk.wav", len(AUDIO))


def test_optional_fields_are_not_sent_when_not_given(relay: RelayServer) -> None:
    client_for(relay).transcribe(
        seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.mp3"))
    )

    (sent,) = relay.requests
    assert sent.fields["timestamp_granularities[]"] == ["segment"]
    assert not {"language", "temperature", "prompt"} & sent.fields.keys()


def test_a_plain_json_answer_is_one_segment_over_the_whole_audio(relay: RelayServer) -> None:
    relay.static_body = {"text": " Just the text. "}

    result = client_for(relay).transcribe(
        seconds_of_samples(3.5),
        options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"), language="fr", word_timestamps=True),
    )

    assert result.text == "Just the text."
    assert result.language == "fr"  # the requested one, since the relay named none
    assert [(s.start, s.end, s.text, s.words) for s in result.segments] == [(0.0, 3.5, "Just the text.", [])]


def test_a_wrong_key_is_a_permanent_rejection_that_names_the_status(relay: RelayServer) -> None:
    wrong = "sk-wrong-7d0a5e31c4"

    with pytest.raises(RelayRejected) as caught:
        client_for(relay, api_key=wrong).transcribe(
            seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"))
        )

    assert isinstance(caught.value, BackendError)
    assert caught.value.transient is False
    assert "401" in caught.value.message
    assert wrong not in caught.value.message  # the relay echoed it; we do not


@pytest.mark.parametrize("status", [400, 413])
def test_other_client_errors_are_permanent(relay: RelayServer, status: int) -> None:
    relay.mode, relay.error_status = "error", status

    with pytest.raises(RelayRejected, match=str(status)) as caught:
        client_for(relay).transcribe(
            seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"))
        )
    assert caught.value.transient is False


def test_a_hanging_relay_times_out_promptly(relay: RelayServer) -> None:
    relay.mode, relay.hang_s = "hang", 5.0
    started = time.monotonic()

    with pytest.raises(BackendTimeout) as caught:
        client_for(relay, timeout_s=0.5).transcribe(
            seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"))
        )

    assert time.monotonic() - started < 2.0
    assert caught.value.transient is True


@pytest.mark.parametrize("stalls", ["status line", "headers", "body"])
def test_a_relay_that_answers_a_byte_at_a_time_is_cut_off_at_the_timeout(stalls: str) -> None:
    """Each read of a slow answer stays within httpx's per-read timeout; the call as a whole must
    still end at ``timeout_s``, or one slow upstream holds a worker (and a stream) for ever."""
    start = {
        "status line": b"",
        "headers": b"HTTP/1.1 200 OK\r\n",
        "body": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n",
    }[stalls]
    drip = b"H" if stalls == "status line" else b"X" if stalls == "headers" else b" "
    with dripping_server(start, drip) as port:
        client = RelayClient(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, model="whisper-1", timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(BackendTimeout) as caught:
            client.transcribe(seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav")))

    assert time.monotonic() - started < 2.0
    assert caught.value.transient is True
    assert "1 s" in caught.value.message


def test_an_answer_larger_than_the_bound_is_not_read(relay: RelayServer) -> None:
    relay.static_body = {"text": "word " * 400}
    client = RelayClient(base_url=relay.base_url, api_key=KEY, model="whisper-1", timeout_s=5, max_response_bytes=1000)

    with pytest.raises(UpstreamShapeMismatch) as caught:
        client.transcribe(seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav")))

    assert "larger than 1000 bytes" in caught.value.message
    assert caught.value.transient is False
    relay.static_body = {"text": "word " * 100}  # under the bound: read as usual
    assert client.transcribe(seconds_of_samples(1.0), options=TranscribeOptions()).text.split() == ["word"] * 100


def test_429_is_rate_limited_with_the_relays_retry_after(relay: RelayServer) -> None:
    relay.mode, relay.retry_after = "ratelimit", 7

    with pytest.raises(BackendRateLimited) as caught:
        client_for(relay).transcribe(
            seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"))
        )

    assert caught.value.retry_after == 7
    assert caught.value.transient is True


def test_429_retry_after_as_http_date_and_absent(relay: RelayServer) -> None:
    relay.mode = "ratelimit"
    relay.retry_after = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    with pytest.raises(BackendRateLimited) as dated:
        client_for(relay).transcribe(
            seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"))
        )
    assert dated.value.retry_after is not None
    assert 28 <= dated.value.retry_after <= 31

    relay.retry_after = None
    with pytest.raises(BackendRateLimited) as bare:
        client_for(relay).transcribe(
            seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"))
        )
    assert bare.value.retry_after == 1


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_transient_backend_errors(relay: RelayServer, status: int) -> None:
    relay.mode, relay.error_status = "error", status

    with pytest.raises(BackendError) as caught:
        client_for(relay).transcribe(
            seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"))
        )

    assert not isinstance(caught.value, RelayRejected | UpstreamShapeMismatch)
    assert caught.value.transient is True
    assert str(status) in caught.value.message


def test_a_closed_port_is_a_transient_backend_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = RelayClient(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, model="whisper-1", timeout_s=2)

    with pytest.raises(BackendError) as caught:
        client.transcribe(seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav")))

    assert type(caught.value) is BackendError
    assert caught.value.transient is True


@pytest.mark.parametrize(
    ("mode", "body"),
    [
        ("badshape", None),
        ("notext", None),
        ("static", {"text": "hi", "segments": [{"start": "zero", "end": 1.0, "text": "hi"}]}),
        ("static", {"text": "hi", "segments": {"start": 0.0}}),
        ("static", {"text": "hi", "words": [{"start": 0.0, "end": 1.0}]}),
        ("static", ["not", "an", "object"]),
    ],
)
def test_answers_we_cannot_read_are_shape_mismatches(relay: RelayServer, mode: str, body: object) -> None:
    relay.mode = mode  # type: ignore[assignment]
    if body is not None:
        relay.static_body = body  # type: ignore[assignment]

    with pytest.raises(UpstreamShapeMismatch) as caught:
        client_for(relay).transcribe(
            seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"))
        )
    assert caught.value.transient is False


def test_the_key_never_shows_in_errors_reprs_or_logs(relay: RelayServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = client_for(relay, timeout_s=0.3)
    seen = [repr(client), str(client)]
    relay.hang_s = 2.0
    for mode in ("static", "hang", "ratelimit", "error", "badshape", "notext"):
        relay.mode = mode  # type: ignore[assignment]
        try:
            client.transcribe(seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav")))
        except (BackendError, BackendTimeout, BackendRateLimited) as exc:
            seen += [str(exc), repr(exc), exc.message, repr(exc.as_error_body())]
    # A rejection of a wrong key, where the relay echoes what it got.
    wrong = RelayClient(base_url=relay.base_url, api_key=KEY + "x", model="whisper-1", timeout_s=2)
    with pytest.raises(RelayRejected) as rejected:
        wrong.transcribe(seconds_of_samples(1.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav")))
    seen += [str(rejected.value), repr(wrong)]

    assert caplog.records, "DEBUG logging was captured"
    seen += [record.getMessage() for record in caplog.records]
    assert not [text for text in seen if KEY in text]


def test_forward_mode_reposts_to_another_relay_with_its_own_key(relay: RelayServer) -> None:
    with RelayServer(api_key="inner-key") as inner:
        inner.static_body = {"text": "from the inner relay", "language": "de"}
        relay.mode, relay.forward_base_url, relay.forward_key = "forward", inner.base_url, "inner-key"

        result = client_for(relay).transcribe(
            seconds_of_samples(2.0), options=TranscribeOptions(original=EncodedAudio(AUDIO, "a.wav"), language="de")
        )

    assert (result.text, result.language) == ("from the inner relay", "de")
    (forwarded,) = inner.requests
    assert forwarded.headers["authorization"] == "Bearer inner-key"
    assert forwarded.fields["model"] == ["whisper-1"]
    assert forwarded.file_size == len(AUDIO)
