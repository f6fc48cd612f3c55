"""Start-up as an operator sees it: production refuses bad settings; the embedded defaults run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.voices import synth_speech, word_error_rate

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh machine: no database, Redis or secret configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "SCAIECHO_", "DJANGO_"))}
    env.pop("SECRET_KEY", None)
    env.pop("ALLOWED_HOSTS", None)
    env.pop("DEBUG", None)
    env["SCAIECHO_DATA_DIR"] = str(tmp_path / "var")
    env.update(extra)
    return env


def production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Production mode with a secret, explicit hosts and PostgreSQL set (each test adds the rest)."""
    return clean_env(
        tmp_path,
        SCAIECHO_ENV="production",
        SECRET_KEY="a-long-random-production-secret-" * 2,
        ALLOWED_HOSTS="stt.example.com",
        DATABASE_URL=os.environ["DATABASE_URL"],
        **extra,
    )


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_production_refuses_to_start_without_secret_hosts_and_database(tmp_path):
    result = run_check(clean_env(tmp_path, SCAIECHO_ENV="production"))
    assert result.returncode != 0
    for check_id in ("scaiecho.E001", "scaiecho.E002", "scaiecho.E003", "scaiecho.E004"):
        assert check_id in result.stderr


def test_production_refuses_to_start_without_a_biometric_key(tmp_path):
    """Voice embeddings and consent recordings are encrypted at rest: no key, no start."""
    result = run_check(production_env(tmp_path))
    assert result.returncode != 0
    assert "scaiecho.E004" in result.stderr
    assert "SCAIECHO_BIOMETRIC_KEYS" in result.stderr


def test_a_malformed_biometric_key_is_refused_at_start(tmp_path):
    result = run_check(clean_env(tmp_path, SCAIECHO_BIOMETRIC_KEYS="not-a-fernet-key"))
    assert result.returncode != 0
    assert "scaiecho.E005" in result.stderr
    assert "not-a-fernet-key" not in result.stderr  # a key is never echoed


def test_an_unknown_speech_engine_is_refused_at_start(tmp_path):
    """In any mode: a typo in the engine setting fails at start-up, not at the first job."""
    result = run_check(clean_env(tmp_path, SCAIECHO_WHISPER_ENGINE="fast-whisper"))
    assert result.returncode != 0
    assert "scaiecho.E006" in result.stderr
    assert "ctranslate2, openai-whisper" in result.stderr
    result = run_check(clean_env(tmp_path, SCAIECHO_WHISPER_COMPUTE_TYPE="int4"))
    assert result.returncode != 0
    assert "scaiecho.E006" in result.stderr


@pytest.mark.parametrize("name", ["SCAIECHO_WHISPER_BEAM_SIZE", "SCAIECHO_STREAM_BEAM_SIZE"])
@pytest.mark.parametrize(("value", "said"), [("0", "scaiecho.E006"), ("-5", "scaiecho.E006"), ("five", "not a whole number"), ("2.5", "not a whole number")])
def test_a_beam_width_that_is_not_a_positive_whole_number_is_refused_at_start(tmp_path, name, value, said):
    """In any mode: jobs or streams would otherwise fail (or decode nothing) at the first audio."""
    result = run_check(clean_env(tmp_path, **{name: value}))
    assert result.returncode != 0
    assert name in result.stderr
    assert said in result.stderr


def test_greedy_decoding_is_a_valid_beam_width(tmp_path):
    result = run_check(clean_env(tmp_path, SCAIECHO_WHISPER_BEAM_SIZE="1", SCAIECHO_STREAM_BEAM_SIZE="1"))
    assert result.returncode == 0, result.stderr


def test_debug_off_means_production(tmp_path):
    result = run_check(clean_env(tmp_path, DEBUG="false", SECRET_KEY="x" * 50, ALLOWED_HOSTS="stt.example.com"))
    assert result.returncode != 0
    assert "scaiecho.E003" in result.stderr
    assert "scaiecho.E001" not in result.stderr
    assert "scaiecho.E002" not in result.stderr


def test_wildcard_hosts_are_not_explicit(tmp_path):
    result = run_check(clean_env(tmp_path, SCAIECHO_ENV="production", SECRET_KEY="x" * 50, ALLOWED_HOSTS="*"))
    assert "scaiecho.E002" in result.stderr


def test_production_refuses_to_start_without_a_webhook_secret_key(tmp_path):
    """Tenants' webhook signing secrets are encrypted at rest: no key, no start."""
    result = run_check(production_env(tmp_path, SCAIECHO_BIOMETRIC_KEYS="Jd4vC1a0m2U8mHq3n1ZrQ6b8dYQ2o4yqkV8Jq9vJ3Zs="))
    assert result.returncode != 0
    assert "scaiecho.E020" in result.stderr
    assert "SCAIECHO_WEBHOOK_SECRET_KEYS" in result.stderr
    result = run_check(clean_env(tmp_path, SCAIECHO_WEBHOOK_SECRET_KEYS="not-a-fernet-key"))
    assert result.returncode != 0
    assert "scaiecho.E021" in result.stderr
    assert "not-a-fernet-key" not in result.stderr
    result = run_check(clean_env(tmp_path, SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT="0"))
    assert result.returncode != 0
    assert "scaiecho.E022" in result.stderr
    result = run_check(clean_env(tmp_path, SCAIECHO_STREAM_CONTEXT_SECONDS="-1"))
    assert result.returncode != 0
    assert "SCAIECHO_STREAM_CONTEXT_SECONDS" in result.stderr
    result = run_check(clean_env(tmp_path, SCAIECHO_STREAM_COMMIT_SECONDS="0.1"))
    assert result.returncode != 0
    assert "SCAIECHO_STREAM_COMMIT_SECONDS" in result.stderr


def test_production_with_everything_set_passes(tmp_path):
    result = run_check(
        production_env(
            tmp_path,
            SCAIECHO_BIOMETRIC_KEYS="Jd4vC1a0m2U8mHq3n1ZrQ6b8dYQ2o4yqkV8Jq9vJ3Zs=",
            SCAIECHO_WEBHOOK_SECRET_KEYS="cQw3n2mK9vT1xZ8pL4sR7uY0bN6hJ5gF2dA1eC3iW8o=",
        )
    )
    assert result.returncode == 0, result.stderr
    assert "scaiecho.E0" not in result.stderr


def test_asgi_server_refuses_production_misconfiguration(tmp_path):
    """daphne does not run Django's checks, so the ASGI module enforces them itself."""
    result = subprocess.run(
        [PYTHON, "-c", "import scaiecho_site.asgi"],
        cwd=ROOT,
        env=clean_env(tmp_path, SCAIECHO_ENV="production"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "scaiecho.E001" in result.stderr


STREAMED = "Good morning everyone. Please send the report to the finance team before Friday."


async def stream_file(url: str) -> list[dict]:
    import websockets

    frames = []
    async with websockets.connect(url, open_timeout=60) as ws:
        await ws.send(json.dumps({"type": "open", "media_type": "audio/wav", "language_hint": "en"}))
        frames.append(json.loads(await ws.recv()))
        await ws.send(synth_speech(STREAMED))
        await ws.send(json.dumps({"type": "close"}))
        async for message in ws:
            frames.append(json.loads(message))
    return frames


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_embedded_defaults_serve_the_seed_request(tmp_path):
    """No PostgreSQL, no Redis: SQLite and the in-process defaults answer the seed curl."""
    env = clean_env(tmp_path)
    subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=300)
    admin = subprocess.run(
        [PYTHON, "manage.py", "create_api_key", "--tenant", "acme", "--user", "alice", "--role", "tenant_admin"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120,
    ).stdout.strip()
    viewer = subprocess.run(
        [PYTHON, "manage.py", "create_api_key", "--tenant", "acme", "--user", "victor", "--role", "tenant_viewer"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120,
    ).stdout.strip()
    assert (tmp_path / "var" / "db.sqlite3").exists()
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [PYTHON, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        response = httpx.get(f"{base}/v1/modules/scaiecho/tenant-policy", headers={"Authorization": f"Bearer {admin}"})
        body = response.json()
        assert response.status_code == 200
        assert body["status"] == "ok"
        assert body["data"]["allowed_backends"] == "AB"
        assert body["data"]["default_backend"] == "B"
        assert body["meta"]["request_id"].startswith("req_")
        denied = httpx.get(f"{base}/v1/modules/scaiecho/tenant-policy", headers={"Authorization": f"Bearer {viewer}"})
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "AUTHZ_PERMISSION_DENIED"
        # Live streaming works too: the web process runs its own stream worker (Backend A).
        frames = asyncio.run(stream_file(f"ws://127.0.0.1:{port}/v1/modules/scaiecho/stream/transcribe?token={admin}"))
        assert frames[0]["type"] == "ready"
        assert frames[0]["backend_used"] == "A"
        assert frames[-1]["type"] == "closed"
        finals = " ".join(f["text"] for f in frames if f["type"] == "delta" and f["is_final"])
        assert word_error_rate(STREAMED, finals) <= 0.25, finals
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()
    shutil.rmtree(tmp_path / "var", ignore_errors=True)


def test_celery_worker_refuses_production_misconfiguration(tmp_path):
    result = subprocess.run(
        [str(Path(PYTHON).parent / "celery"), "-A", "scaiecho_site", "worker", "--pool=solo"],
        cwd=ROOT,
        env=clean_env(tmp_path, SCAIECHO_ENV="production"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "scaiecho.E001" in result.stderr


def test_redis_carries_cache_broker_and_channel_layer_across_processes(settings):
    """With REDIS_URL set, a message another process puts on the channel layer arrives here."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from scaiecho_site.celery import app

    assert settings.CACHES["default"]["BACKEND"].endswith("RedisCache")
    assert app.conf.broker_url == settings.CELERY_BROKER_URL
    assert settings.CELERY_BROKER_URL.startswith("redis://")
    layer = get_channel_layer()
    assert type(layer).__name__ == "RedisChannelLayer"
    channel = async_to_sync(layer.new_channel)()
    script = (
        "import django; django.setup()\n"
        "from asgiref.sync import async_to_sync\n"
        "from channels.layers import get_channel_layer\n"
        f"async_to_sync(get_channel_layer().send)({channel!r}, {{'type': 'probe', 'text': 'from another process'}})\n"
    )
    subprocess.run([PYTHON, "-c", script], cwd=ROOT, check=True, timeout=60, env={**os.environ, "DJANGO_SETTINGS_MODULE": "scaiecho_site.settings"})
    message = async_to_sync(layer.receive)(channel)
    assert message == {"type": "probe", "text": "from another process"}
