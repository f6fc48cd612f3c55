"""Fixtures of the browser tests."""

from __future__ import annotations

import pytest

from tests.workers import DaphneServer


@pytest.fixture(scope="module")
def server(live_daphne: DaphneServer) -> DaphneServer:
    """The ASGI server (daphne) on the test database, one per test module."""
    return live_daphne
