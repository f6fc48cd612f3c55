"""Cross-cutting HTTP plumbing: request ids, body size limits, and the envelope for everything
that does not come from a DRF view (unknown routes, Django's own error pages, crashes)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import BadRequest, PermissionDenied, SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse

from scaiecho_site import errors
from scaiecho_site.bodylimit import body_limit, too_large
from scaiecho_site.envelope import REQUEST_ID_HEADER, error_json_response, request_id_from_header

logger = logging.getLogger("scaiecho.errors")

# Paths that keep Django's HTML pages: the admin and static files are for people, not clients.
_HTML_PREFIXES = ("/admin/", "/static/", "/captions/")

_DJANGO_HANDLED = (Http404, PermissionDenied, SuspiciousOperation, BadRequest)

_STATUS_ERRORS: dict[int, type[errors.ApplicationError]] = {
    400: errors.ValidationError,
    401: errors.AuthTokenMissing,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
    415: errors.UnsupportedMedia,
}


class RequestIdMiddleware:
    """Give every request an id (a client's valid ``X-Request-Id`` is echoed) and return it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request.request_id = request_id_from_header(request.headers.get(REQUEST_ID_HEADER))
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request.request_id
        return response


class EnvelopeFallbackMiddleware:
    """Turn Django's HTML error pages and uncaught exceptions into the envelope."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code < 400 or request.path.startswith(_HTML_PREFIXES):
            return response
        if response.get("Content-Type", "").startswith("application/json"):
            return response
        if response.status_code >= 500:
            return error_json_response(request, errors.InternalError())
        error_class = _STATUS_ERRORS.get(response.status_code, errors.ValidationError)
        enveloped = error_json_response(request, error_class())
        enveloped.status_code = response.status_code
        return enveloped

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, _DJANGO_HANDLED):
            return None  # Django answers these with a 4xx, which __call__ then envelopes
        if request.path.startswith(_HTML_PREFIXES) and settings.DEBUG:
            return None  # the developer's debug page
        if isinstance(exception, errors.ApplicationError):
            return error_json_response(request, exception)
        logger.error("unhandled exception request_id=%s", request.request_id, exc_info=exception)
        return error_json_response(request, errors.InternalError())


class BodySizeLimitMiddleware:
    """Refuse a request whose declared body is over its route's limit before reading it.

    Under daphne (or any ASGI server) ``scaiecho_site.bodylimit`` has refused such a body while
    it arrived, before Django saw it; this is the same rule for Django's own handlers (WSGI, the
    test client). The files' own sizes are checked where uploads are handled.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        limit = body_limit(request.method or "GET", request.path)
        if declared > limit:
            return error_json_response(request, too_large(limit=limit, declared=declared))
        return self.get_response(request)
