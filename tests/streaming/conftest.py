"""Fixtures of the streaming tests: Backend B is a real local relay server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.relay_server import DEFAULT_VERBOSE_JSON, RelayServer
from tests.voices import synth_speech

RELAY_KEY = "stream-relay-key"


@pytest.fixture(scope="module")
def relay_server() -> Iterator[RelayServer]:
    with RelayServer(api_key=RELAY_KEY) as server:
        yield server


@pytest.fixture
def relay(relay_server: RelayServer, settings) -> Iterator[RelayServer]:
    settings.SCAIECHO_RELAY_BASE_URL = relay_server.base_url
    settings.SCAIECHO_RELAY_API_KEY = RELAY_KEY
    relay_server.requests.clear()
    relay_server.mode = "static"
    yield relay_server
    relay_server.mode = "static"
    relay_server.static_body = DEFAULT_VERBOSE_JSON


@pytest.fixture(scope="module")
def speech_wav() -> bytes:
    return synth_speech("Good morning everyone. Today we will review the quarterly budget.")
