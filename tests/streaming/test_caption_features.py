"""``GET /captions/features``: the caption page learns whether to offer the speaker toggle, with
the key or with a caption link's token; a wrong or expired credential learns nothing."""

from __future__ import annotations

import time

import pytest

from streaming.tokens import caption_token_issue
from tenants.models import PERM_DIARIZE, AuditEvent, Role
from tests.factories import KeyFactory

pytestmark = pytest.mark.django_db

FEATURES = "/captions/features"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_key_that_may_diarize_gets_the_speaker_toggle(api):
    admin = KeyFactory.issue(role=Role.TENANT_ADMIN)
    response = api.get(FEATURES, headers=admin.headers)
    assert response.status_code == 200, response.content
    assert response.json()["data"] == {"diarize": True}
    assert response["Cache-Control"] == "no-store"
    assert AuditEvent.objects.filter(action="caption_features.read", resource_id=str(admin.key.pk)).count() == 1
    assert 'data-features-url="/captions/features"' in api.get("/captions/").content.decode()


def test_a_viewer_gets_none_unless_granted_diarize(api):
    viewer = KeyFactory.issue(role=Role.TENANT_VIEWER)
    assert api.get(FEATURES, headers=viewer.headers).json()["data"] == {"diarize": False}
    granted = KeyFactory.issue(role=Role.TENANT_VIEWER, grants=[PERM_DIARIZE])
    assert api.get(FEATURES, headers=granted.headers).json()["data"] == {"diarize": True}


def test_a_caption_link_token_is_enough(api):
    admin = KeyFactory.issue(role=Role.TENANT_ADMIN)
    token = caption_token_issue(api_key_id=admin.key.pk)
    response = api.get(FEATURES, headers=bearer(token))
    assert response.status_code == 200, response.content
    assert response.json()["data"] == {"diarize": True}


def test_a_key_without_transcribe_is_refused(api):
    nobody = KeyFactory.issue(role=Role.TENANT_USER)
    response = api.get(FEATURES, headers=nobody.headers)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "AUTHZ_PERMISSION_DENIED"


def test_wrong_or_expired_credentials_are_refused(api):
    admin = KeyFactory.issue(role=Role.TENANT_ADMIN)
    expired = caption_token_issue(api_key_id=admin.key.pk, ttl_seconds=0)
    time.sleep(1.1)
    for token in (expired, "sct_forged", "sgk_" + "x" * 40):
        response = api.get(FEATURES, headers=bearer(token))
        assert response.status_code == 401, (token, response.content)
        assert response.json()["error"]["code"] == "AUTH_TOKEN_INVALID"
    missing = api.get(FEATURES)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "AUTH_TOKEN_MISSING"
