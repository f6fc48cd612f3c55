"""The speaker model, loaded once per test session (about 1 s and 0.5 GB)."""

from __future__ import annotations

import pytest

from speakers.embedding import SpeakerEncoder


@pytest.fixture(scope="session")
def encoder() -> SpeakerEncoder:
    model = SpeakerEncoder(cpu_threads=1)
    model.load()
    return model
