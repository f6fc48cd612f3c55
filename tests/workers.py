"""Real worker processes, a real local relay and a real daphne server for the end-to-end tests.

The worker runs against the test database (committed data only: tests that need it use
``transactional_db``) and the same Redis broker, with the default Whisper model, and Backend B
pointed at a local server that speaks OpenAI's transcription protocol.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests.processes import ManagedProcess
from tests.relay_server import RelayServer
from transcription.services import worker_heartbeat

ROOT = Path(__file__).resolve().parents[2]
RELAY_KEY = "relay-secret-key-not-for-logs"
CELERY = str(Path(sys.executable).parent / "celery")
# espeak-ng voices are far more alike than people (models.md: same voice ~0.84, different up to
# ~0.6 for two male voices), so the diarization tests over synthetic voices match at 0.6 instead of
# the default tuned for real speech (0.3; tests/speakers/test_embedding.py checks it on real voices).
SYNTHETIC_VOICE_THRESHOLDS = {
    "SCAIECHO_SPEAKER_MATCH_THRESHOLD": "0.6",
    # Measured on the test voices' 1.5 s windows: each voice stays one cluster up to 0.55, and the
    # four voices are four clusters from 0.5 (Alice and the stranger merge below).
    "SCAIECHO_SPEAKER_CLUSTER_THRESHOLD": "0.5",
    "SCAIECHO_SPEAKER_CLUSTER_THRESHOLD_NARROWBAND": "0.5",
}


def database_url_for_workers() -> str:
    db = settings.DATABASES["default"]
    return f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class WorkerProcess(ManagedProcess):
    """``celery -A scaiecho_site worker`` as an operator starts it, with a few settings for tests."""

    def __init__(
        self, *, name: str, env: dict[str, str], log_path: Path, queue: str = "celery", concurrency: int = 2, pool: str = "prefork"
    ) -> None:
        self.name = name
        self.node = f"{name}@{os.uname().nodename}"
        super().__init__(
            command=[
                CELERY, "-A", "scaiecho_site", "worker", "-n", self.node, "-Q", queue,
                f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO",
            ],
            env=env,
            log_path=log_path,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        self.wait_for_log(b" ready.", timeout=timeout, what="worker")


@pytest.fixture(scope="session")
def relay() -> Iterator[RelayServer]:
    with RelayServer(api_key=RELAY_KEY) as server:
        yield server


@pytest.fixture(scope="session")
def worker_env(relay: RelayServer, django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url_for_workers(),
        "SCAIECHO_MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "SCAIECHO_RELAY_BASE_URL": relay.base_url,
        "SCAIECHO_RELAY_API_KEY": RELAY_KEY,
        "SCAIECHO_RELAY_TIMEOUT_SECONDS": "10",
        "SCAIECHO_JOB_MAX_RETRIES": "1",
        "SCAIECHO_JOB_RETRY_BACKOFF_SECONDS": "1",
        "SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS": "6",
        "SCAIECHO_WHISPER_CPU_THREADS": "1",
        # Low enough that a test can send longer audio without making hours of it.
        "SCAIECHO_MAX_AUDIO_SECONDS": "120",
        # As scripts/run does: the workers and the daphne server of the session add up their
        # metrics through one folder, so /metrics shows what a worker timed (tests/test_metrics.py).
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prometheus")),
        # Webhooks go to a receiver on 127.0.0.1 (tests/transcription/test_webhooks.py), with
        # retries a test can wait for: 1 s per attempt, 0.2 s then 0.4 s between, 3 attempts.
        "SCAIECHO_WEBHOOK_ALLOW_PRIVATE": "true",
        "SCAIECHO_WEBHOOK_TIMEOUT_SECONDS": "1",
        "SCAIECHO_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
        "SCAIECHO_WEBHOOK_MAX_ATTEMPTS": "3",
        **SYNTHETIC_VOICE_THRESHOLDS,
    }


@pytest.fixture(scope="session")
def worker_process(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    log_dir = tmp_path_factory.mktemp("worker")
    worker = WorkerProcess(name="batch", env=worker_env, log_path=log_dir / "worker.log")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="session")
def webhook_worker_process(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """The webhook worker as ``scripts/run`` starts it: the webhook queue only, in threads."""
    log_dir = tmp_path_factory.mktemp("webhook-worker")
    worker = WorkerProcess(
        name="webhooks", env=worker_env, log_path=log_dir / "worker.log", queue=settings.SCAIECHO_WEBHOOK_QUEUE, concurrency=4, pool="threads"
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def webhook_worker(webhook_worker_process: WorkerProcess, transactional_db: None) -> WorkerProcess:
    return webhook_worker_process


@pytest.fixture
def speech_worker(worker_process: WorkerProcess, transactional_db: None) -> WorkerProcess:
    """The session's worker, announced in this test's (freshly flushed) database."""
    worker_heartbeat(worker_id=worker_process.node)
    return worker_process


def never_available() -> bool:
    return False


@pytest.fixture
def no_worker_alive(settings: Any) -> None:
    """Backend A as if no worker were alive: the session's worker keeps beating, so the web side's
    availability check (a pluggable setting) is told so instead; the heartbeat check itself is
    tested in tests/tenants/test_policy.py."""
    settings.SCAIECHO_BACKEND_AVAILABILITY_CHECKS = {
        **settings.SCAIECHO_BACKEND_AVAILABILITY_CHECKS,
        "A": "tests.workers.never_available",
    }


class DaphneServer(ManagedProcess):
    """``manage.py runserver`` (daphne, ASGI) as a subprocess on a free port, on the test database."""

    def __init__(self, *, env: dict[str, str], log_path: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            command=[sys.executable, "manage.py", "runserver", f"127.0.0.1:{self.port}", "--noreload", "--skip-checks"],
            env=env,
            log_path=log_path,
        )
        self.wait_until(self._answers, timeout=60, what="daphne")

    def _answers(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False


@pytest.fixture(scope="module")
def live_daphne(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    """A daphne server of one test module, on the test database, with the environment as it is
    (not the session workers' settings that :func:`daphne_server` runs with)."""
    env = {**os.environ, "DATABASE_URL": database_url_for_workers()}
    server = DaphneServer(env=env, log_path=tmp_path_factory.mktemp("daphne") / "daphne.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def daphne_server(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    server = DaphneServer(env=worker_env, log_path=tmp_path_factory.mktemp("daphne") / "daphne.log")
    try:
        yield server
    finally:
        server.stop()
