"""Live streams decode at the operator's beam width (``SCAIECHO_STREAM_BEAM_SIZE``, issue 10: on
the real conversations a beam of 5 took stream WER from 10.8 % to 8.2 % (phone band: 19.0 % to
12.3 %) at about the same compute, because a stream's short windows cost mostly the encoder).

The stream worker runs in this process, on the real CTranslate2 engine built from the settings, as
the embedded worker of the in-memory channel layer does. The stream decoder is watched, not
replaced: the test sees the width of every decode and the words that came of them.
"""

from __future__ import annotations

import pytest

from scaiecho_site import engines
from speech.engines.ctranslate2 import ShortWindowCTranslate2
from tenants.models import Role
from tests.streaming.test_consumer import issue, run
from tests.streaming.test_stream_worker import embedded_worker, spoken_then_silent, stream_and_close
from tests.transcription.test_beam_size import options_seen_by
from tests.voices import word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SENTENCE = "Please send the report to the finance team before Friday."


@pytest.mark.parametrize("width", [5, 1])
def test_a_stream_is_decoded_at_the_configured_beam_width(settings, monkeypatch, width):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.SCAIECHO_WHISPER_ENGINE = "ctranslate2"
    settings.SCAIECHO_WHISPER_DEVICE = "cpu"
    settings.SCAIECHO_STREAM_BEAM_SIZE = width
    monkeypatch.setattr(engines, "_engine", None)
    seen = options_seen_by(ShortWindowCTranslate2, monkeypatch)
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))

    async def scenario() -> list[dict]:
        async with embedded_worker(engines.build_engine(), monkeypatch):
            seen.clear()  # the lanes' warm-up decodes are not the stream's
            return await stream_and_close(key, spoken_then_silent(SENTENCE))

    frames = run(scenario())

    finals = " ".join(f["text"] for f in frames if f["type"] == "delta" and f["is_final"])
    assert word_error_rate(SENTENCE, finals) <= 0.25, finals
    widths = [options.beam_size or 1 for options in seen]
    assert widths
    assert set(widths) == {width}, widths
