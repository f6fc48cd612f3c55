"""``/healthz`` and ``/readyz`` as a load balancer sees them."""

from __future__ import annotations

import pytest

from transcription.services import worker_heartbeat

pytestmark = pytest.mark.django_db


PREFIXES = ["", "/v1/modules/scaiecho"]  # the root, and under the module prefix (issue 12)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_readyz_ok_when_database_broker_redis_and_a_backend_answer(client, settings, prefix):
    settings.SCAIECHO_PHASE = "beta-2"
    worker_heartbeat(worker_id="w@readyz")
    response = client.get(f"{prefix}/readyz")
    body = response.json()
    assert response.status_code == 200, body
    assert (body["status"], body["module"], body["phase"]) == ("ok", "scaiecho", "beta-2")
    assert body["checks"] == {"database": "ok", "broker": "ok", "redis": "ok", "backends": "ok"}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_readyz_degraded_without_any_backend(client, settings, prefix):
    settings.SCAIECHO_RELAY_BASE_URL = ""
    response = client.get(f"{prefix}/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["failing"] == ["backends"]


def test_readyz_degraded_when_redis_is_down(client, settings):
    settings.SCAIECHO_RELAY_BASE_URL = "http://127.0.0.1:9/oai/v1"
    settings.SCAIECHO_RELAY_API_KEY = "k"
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}
    }
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    response = client.get("/readyz")
    assert response.status_code == 503
    assert set(response.json()["failing"]) == {"redis", "broker"}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_healthz_answers_the_same_at_the_root_and_under_the_module_prefix(client, prefix):
    response = client.get(f"{prefix}/healthz")
    assert response.status_code == 200
    assert response.json() == client.get("/healthz").json()
    assert response.json()["status"] == "ok"
