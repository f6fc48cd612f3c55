"""Shared fixtures. The suite runs against the real PostgreSQL and Redis named by DATABASE_URL
and REDIS_URL (``scripts/test`` sets both) and stops at once when either is missing."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.core.cache import cache
from rest_framework.test import APIClient

from tests.factories import IssuedKey, KeyFactory
from tests.workers import (  # noqa: F401  (fixtures shared by the end-to-end tests of every app)
    daphne_server,
    no_worker_alive,
    relay,
    speech_worker,
    worker_env,
    worker_process,
)


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def pytest_sessionstart(session: pytest.Session) -> None:
    engine = settings.DATABASES["default"]["ENGINE"]
    problems = []
    if "postgresql" not in engine:
        problems.append(f"DATABASE_URL must point at PostgreSQL (the settings use {engine}).")
    elif not _reachable(settings.DATABASE_URL, 5432):
        problems.append(f"PostgreSQL is not answering at {settings.DATABASE_URL}.")
    if not settings.REDIS_URL:
        problems.append("REDIS_URL is not set: the tests need the real Redis.")
    elif not _reachable(settings.REDIS_URL, 6379):
        problems.append(f"Redis is not answering at {settings.REDIS_URL}.")
    if problems:
        pytest.exit("Test services missing:\n  " + "\n  ".join(problems) + "\nRun the tests with scripts/test.", returncode=2)


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    cache.clear()
    return


@pytest.fixture
def api() -> APIClient:
    return APIClient()


@pytest.fixture
def issue_key(db: None) -> Callable[..., IssuedKey]:
    """``issue_key(role="tenant_admin", tenant=None, grants=())`` → an API key and its secret."""
    return KeyFactory.issue


@pytest.fixture
def admin_key(issue_key: Callable[..., IssuedKey]) -> IssuedKey:
    return issue_key(role="tenant_admin")


@pytest.fixture(scope="session")
def encoder():
    """The speaker model, loaded once per test session (about 1 s and 0.5 GB)."""
    from speech.embedding import SpeakerEncoder

    model = SpeakerEncoder(cpu_threads=1)
    model.load()
    return model
