"""Under daphne, a request waiting for its transcription does not hold up other requests."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.test_run_script import SPOKEN  # about 40 s: long enough to be still running after 1 s
from tests.transcription.test_batch_api import key_with_policy
from tests.voices import synth_speech, word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_inline_requests_run_side_by_side_and_health_answers_meanwhile(daphne_server, speech_worker):
    key = key_with_policy("A", "A")
    wav = synth_speech(SPOKEN)

    def transcribe() -> tuple[float, dict]:
        started = time.monotonic()
        response = httpx.post(
            f"{daphne_server.url}/v1/modules/scaiecho/transcribe",
            headers={"Authorization": f"Bearer {key.secret}"},
            files={"file": ("speech.wav", wav, "audio/wav")},
            data={"language_hint": "en"},
            timeout=180,
        )
        return time.monotonic() - started, response.json()

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(transcribe) for _ in range(2)]
        time.sleep(1.0)  # both are now waiting for the worker
        assert not any(future.done() for future in futures)
        health_started = time.monotonic()
        health = httpx.get(f"{daphne_server.url}/healthz", timeout=30)
        health_latency = time.monotonic() - health_started
        policy = httpx.get(f"{daphne_server.url}/v1/modules/scaiecho/tenant-policy", headers={"Authorization": f"Bearer {key.secret}"}, timeout=30)
        still_waiting = not any(future.done() for future in futures)
        results = [future.result() for future in futures]

    assert health.status_code == 200
    assert policy.status_code == 200
    assert health_latency < 1.0
    assert still_waiting, "the transcriptions finished before the other requests could show anything"
    for _elapsed, body in results:
        assert word_error_rate(SPOKEN, body["data"]["transcript"]) <= 0.15
