"""The API description a developer reads."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_schema_describes_every_endpoint_with_its_envelopes(client):
    response = client.get("/v1/modules/scaiecho/openapi.json")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi+json") or response["Content-Type"].startswith("application/json")
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    policy = schema["paths"]["/v1/modules/scaiecho/tenant-policy"]
    assert set(policy) >= {"get", "patch", "put"}
    assert {"/healthz", "/readyz", "/v1/modules/scaiecho/api-keys", "/v1/modules/scaiecho/api-keys/{key_id}"} <= set(schema["paths"])
    for operation in policy.values():
        for status in ("401", "403", "429"):
            ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorEnvelope")
        success = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        assert set(schema["components"]["schemas"][success]["properties"]) == {"status", "data", "meta"}
    assert "422" in policy["put"]["responses"]
    error = schema["components"]["schemas"]["Error"]["properties"]
    assert {"code", "message", "details", "retry_after"} <= set(error)
    assert schema["components"]["securitySchemes"]["ApiKey"] == {"type": "http", "scheme": "bearer", "bearerFormat": "sgk_<key>"}


def test_docs_page_works_offline(client):
    page = client.get("/v1/modules/scaiecho/docs")
    assert page.status_code == 200
    html = page.content.decode()
    assert "swagger" in html.lower()
    # The Swagger UI assets come from this server (the sidecar package), not from a CDN.
    assert "cdn.jsdelivr" not in html
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    asset = client.get("/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")
    assert asset.status_code == 200
