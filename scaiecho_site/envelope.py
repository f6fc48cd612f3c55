"""The response envelope and the one DRF exception handler.

Success: ``{"status": "ok", "data": ..., "meta": {"request_id": ...}}``.
Failure: ``{"status": "error", "error": {"code", "message", "details"?, "retry_after"?},
"meta": {"request_id": ...}}``. Everything a client can see goes through :func:`ok` or
:func:`error_response`; the middleware in ``scaiecho_site.middleware`` covers what never reaches
a DRF view (unknown routes, Django's own error pages).
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.metadata import SimpleMetadata
from rest_framework.response import Response

from scaiecho_site import errors

logger = logging.getLogger("scaiecho.errors")

REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{7,127}$")


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def request_id_from_header(value: str | None) -> str:
    """Echo a client's request id when it is safe to log and repeat; otherwise mint one."""
    if value and _CLIENT_REQUEST_ID.match(value):
        return value
    return new_request_id()


def request_id_of(request: Any) -> str:
    django_request = getattr(request, "_request", request)
    request_id = getattr(django_request, "request_id", None)
    if request_id is None:
        request_id = new_request_id()
        django_request.request_id = request_id
    return request_id


def ok(request: Any, data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = {"status": "ok", "data": data, "meta": {"request_id": request_id_of(request)}}
    return Response(body, status=status, headers=headers)


class EnvelopeMetadata(SimpleMetadata):
    """``OPTIONS`` answers DRF's description of the view, inside the envelope like every answer."""

    def determine_metadata(self, request: Any, view: Any) -> dict[str, Any]:
        return {"status": "ok", "data": super().determine_metadata(request, view), "meta": {"request_id": request_id_of(request)}}


def error_body(error: errors.ApplicationError, request_id: str) -> dict[str, Any]:
    return {"status": "error", "error": error.as_error_body(), "meta": {"request_id": request_id}}


def error_headers(error: errors.ApplicationError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if error.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="scaiecho"'
    return headers


def error_json_response(request: HttpRequest, error: errors.ApplicationError) -> JsonResponse:
    """For plain Django views and middleware, where no DRF ``Response`` is rendered."""
    response = JsonResponse(error_body(error, request_id_of(request)), status=error.http_status)
    for name, value in error_headers(error).items():
        response[name] = value
    return response


def _validation_details(detail: Any, prefix: str = "") -> list[dict[str, str]]:
    """Flatten DRF's nested error detail into the contract's ``[{"field", "message"}]``."""
    if isinstance(detail, dict):
        items: list[dict[str, str]] = []
        for key, value in detail.items():
            field = "body" if key == "non_field_errors" else key
            items.extend(_validation_details(value, f"{prefix}.{field}" if prefix else str(field)))
        return items
    if isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            return [{"field": prefix or "body", "message": str(item)} for item in detail]
        items = []
        for index, value in enumerate(detail):
            items.extend(_validation_details(value, f"{prefix}[{index}]"))
        return items
    return [{"field": prefix or "body", "message": str(detail)}]


def to_application_error(exc: Exception) -> errors.ApplicationError:
    """Map any exception to the application error a client sees."""
    if isinstance(exc, errors.ApplicationError):
        return exc
    if isinstance(exc, drf_exceptions.NotAuthenticated):
        return errors.AuthTokenMissing()
    if isinstance(exc, drf_exceptions.AuthenticationFailed):
        return errors.AuthTokenInvalid()
    if isinstance(exc, (drf_exceptions.PermissionDenied, DjangoPermissionDenied)):
        return errors.PermissionDenied()
    if isinstance(exc, (drf_exceptions.NotFound, Http404)):
        return errors.NotFound()
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        return errors.MethodNotAllowed(str(exc.detail))
    if isinstance(exc, drf_exceptions.UnsupportedMediaType):
        return errors.UnsupportedMedia(str(exc.detail))
    if isinstance(exc, drf_exceptions.NotAcceptable):
        return errors.ValidationError(
            "This API answers only application/json.", details=[{"field": "Accept", "message": str(exc.detail)}]
        )
    if isinstance(exc, drf_exceptions.ParseError):
        return errors.ValidationError("The request body could not be parsed.", details=[{"field": "body", "message": str(exc.detail)}])
    if isinstance(exc, drf_exceptions.ValidationError):
        return errors.ValidationError(details=_validation_details(exc.detail))
    if isinstance(exc, drf_exceptions.Throttled):
        return errors.RateLimited(retry_after=int(exc.wait or 1))
    if isinstance(exc, drf_exceptions.APIException) and exc.status_code == 413:
        return errors.PayloadTooLarge()
    return errors.InternalError()


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's exception handler: every failure leaves in the envelope, never as a bare 500."""
    request = context.get("request")
    request_id = request_id_of(request) if request is not None else new_request_id()
    error = to_application_error(exc)
    if isinstance(error, errors.InternalError):
        logger.error("unhandled exception request_id=%s", request_id, exc_info=exc)
    return Response(error_body(error, request_id), status=error.http_status, headers=error_headers(error))
