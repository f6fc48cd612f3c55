"""Shared fixtures. The suite runs against the real PostgreSQL and Redis named by DATABASE_URL
and REDIS_URL (``scripts/test`` sets both) and stops at once when either is missing."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.core.cache import cache
from rest_framework.test import APIClient

from tests.factories import IssuedKey, KeyFactory
from tests.workers import (  # noqa: F401  (fixtures shared by the end-to-end tests of every app)
    daphne_server,
    live_daphne,
    no_worker_alive,
    relay,
    speech_worker,
    webhook_worker,
    webhook_worker_process,
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
        pytest.exit(
            "Test services missing:\n  " + "\n  ".join(problems) + "\nRun the tests with scripts/test.", returncode=2
        )


@pytest.fixture(scope="session", autouse=True)
def _flush_outlasts_deadlocks() -> Iterator[None]:
    """The session's speech worker and daphne server keep working between tests (heartbeats, the
    orphan sweep, a job still finishing). A transactional test's closing TRUNCATE can then meet one
    of their transactions in a lock cycle; PostgreSQL breaks it by failing the TRUNCATE, which
    is safe to run again once the other side has gone on."""
    from django.db import OperationalError
    from django.db.backends.postgresql.operations import DatabaseOperations

    flush = DatabaseOperations.execute_sql_flush

    def patient_flush(self: DatabaseOperations, sql_list: list[str]) -> None:
        for attempt in range(5):
            try:
                return flush(self, sql_list)
            except OperationalError as exc:
                if "deadlock detected" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    DatabaseOperations.execute_sql_flush = patient_flush
    try:
        yield
    finally:
        DatabaseOperations.execute_sql_flush = flush


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


NOBODY_TAKES = "jobs-nobody-takes"


@contextlib.contextmanager
def tasks_routed_to_nobody(pattern: str, queue: str) -> Iterator[None]:
    """Tasks matching ``pattern`` (e.g. ``"transcription.*"``) go to ``queue``, which no worker
    reads, and the queue is purged after: for tests that run those tasks themselves, so that the
    session's real worker, if one runs, does not take them first."""
    from scaiecho_site.celery import app

    saved = app.conf.task_routes

    def route(routes: object) -> None:
        app.conf.task_routes = routes
        app.amqp.flush_routes()
        app.amqp.__dict__.pop("router", None)  # a cached property built from the routes

    route({pattern: {"queue": queue}})
    try:
        yield
    finally:
        route(saved)
        with app.connection_for_write() as connection:
            try:
                connection.default_channel.queue_purge(queue)
            except Exception:  # noqa: BLE001 - nothing was ever sent there
                pass


@pytest.fixture
def jobs_nobody_takes() -> Iterator[None]:
    """Transcription tasks enqueued in this test go to a queue no worker reads (see
    :func:`tasks_routed_to_nobody`), for tests that finish jobs themselves."""
    with tasks_routed_to_nobody("transcription.*", NOBODY_TAKES):
        yield
