"""Every response has the contract's shape and a request id."""

from __future__ import annotations

import logging

import pytest

from tests.tenants.test_auth import POLICY_URL, assert_error

pytestmark = pytest.mark.django_db


def test_success_envelope(api, admin_key):
    response = api.get(POLICY_URL, headers=admin_key.headers)
    body = response.json()
    assert set(body) == {"status", "data", "meta"}
    assert body["status"] == "ok"
    assert body["meta"]["request_id"].startswith("req_")
    assert response["X-Request-Id"] == body["meta"]["request_id"]


def test_client_request_id_is_echoed(api, admin_key):
    response = api.get(POLICY_URL, headers={**admin_key.headers, "X-Request-Id": "trace-7f3a9c01"})
    assert response["X-Request-Id"] == "trace-7f3a9c01"
    assert response.json()["meta"]["request_id"] == "trace-7f3a9c01"


@pytest.mark.parametrize("bad", ["x", "has space in it", "a" * 200, "<script>alert(1)</script>"])
def test_unsafe_client_request_id_is_replaced(api, admin_key, bad):
    response = api.get(POLICY_URL, headers={**admin_key.headers, "X-Request-Id": bad})
    assert response["X-Request-Id"].startswith("req_")
    assert response.json()["meta"]["request_id"] == response["X-Request-Id"]


def test_request_ids_differ(api, admin_key):
    ids = {api.get(POLICY_URL, headers=admin_key.headers)["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("path", ["/v1/modules/scaiecho/nope", "/nope", "/v1/modules/scaiecho/tenant-policy/extra"])
def test_unknown_route_is_enveloped_404(api, path):
    assert_error(api.get(path), 404, "NOT_FOUND")


def test_method_not_allowed(api, admin_key):
    assert_error(api.delete(POLICY_URL, headers=admin_key.headers), 405, "METHOD_NOT_ALLOWED")


def test_payload_too_large(api, admin_key, settings):
    settings.SCAIECHO_MAX_REQUEST_BYTES = 1000
    body = "x" * 1001
    response = api.generic("PATCH", POLICY_URL, body, content_type="application/json", headers=admin_key.headers)
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")


def test_unsupported_content_type(api, admin_key):
    response = api.generic("PATCH", POLICY_URL, "allowed_backends=A", content_type="text/plain", headers=admin_key.headers)
    assert_error(response, 415, "UNSUPPORTED_MEDIA")


def test_malformed_json_is_validation_error(api, admin_key):
    response = api.generic("PATCH", POLICY_URL, "{not json", content_type="application/json", headers=admin_key.headers)
    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert body["error"]["details"][0]["field"] == "body"


def test_validation_error_lists_fields(api, admin_key):
    response = api.put(POLICY_URL, {}, format="json", headers=admin_key.headers)
    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert {d["field"] for d in body["error"]["details"]} == {"allowed_backends", "default_backend"}
    assert all(d["message"] for d in body["error"]["details"])


@pytest.mark.urls("tests.boom_urls")
def test_unexpected_exception_in_api_is_enveloped_500_and_logged(api, admin_key, caplog):
    with caplog.at_level(logging.ERROR, logger="scaiecho.errors"):
        response = api.get("/v1/modules/scaiecho/boom", headers=admin_key.headers)
    body = assert_error(response, 500, "INTERNAL_ERROR")
    assert "sk-live" not in response.content.decode()
    assert "Traceback" not in response.content.decode()
    assert any(body["meta"]["request_id"] in record.getMessage() for record in caplog.records)


@pytest.mark.urls("tests.boom_urls")
def test_unexpected_exception_outside_drf_is_enveloped_500(client, caplog):
    with caplog.at_level(logging.ERROR, logger="scaiecho.errors"):
        response = client.get("/plain-boom")
    body = assert_error(response, 500, "INTERNAL_ERROR")
    assert "sk-live" not in response.content.decode()
    assert any(body["meta"]["request_id"] in record.getMessage() for record in caplog.records)


def test_healthz_is_the_one_unenveloped_body(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "module": "scaiecho"}
