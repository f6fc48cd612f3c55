"""``/healthz`` (the process answers) and ``/readyz`` (it can do useful work)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from drf_spectacular.utils import extend_schema, extend_schema_view, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from scaiecho_site.envelope import request_id_of
from tenants.services import backend_available

logger = logging.getLogger("scaiecho.health")

# What /readyz says of each check, and of a process that is not ready: stable values, no internals.
CHECK_OK = "ok"
CHECK_UNAVAILABLE = "unavailable"
NOT_READY_CODE = "SCAIECHO_NOT_READY"


def check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def check_cache() -> None:
    cache.set("scaiecho:readyz", "1", timeout=5)
    if cache.get("scaiecho:readyz") != "1":
        raise RuntimeError("cache did not return what was written")


def check_broker() -> None:
    from scaiecho_site.celery import app

    with app.connection_for_write(settings.CELERY_BROKER_URL) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def check_backends() -> None:
    available = [backend for backend in ("A", "B") if backend_available(backend)]
    if not available:
        raise RuntimeError("no speech backend is available (no live worker, no relay configured)")


class HealthzApi(APIView):
    authentication_classes: list[type] = []
    permission_classes: list[type] = []

    @extend_schema(
        operation_id="healthz",
        responses=inline_serializer("Healthz", fields={"status": serializers.CharField(), "module": serializers.CharField()}),
    )
    def get(self, request: Request) -> Response:
        return Response({"status": "ok", "module": "scaiecho"})


class ReadyzApi(APIView):
    authentication_classes: list[type] = []
    permission_classes: list[type] = []

    @extend_schema(
        operation_id="readyz",
        responses={
            (status, "application/json"): inline_serializer(
                f"Readyz{status}",
                fields={
                    "status": serializers.ChoiceField(choices=["ok", "degraded"]),
                    "module": serializers.CharField(),
                    "phase": serializers.CharField(),
                    "checks": serializers.DictField(child=serializers.CharField(help_text="ok or unavailable")),
                    "failing": serializers.ListField(child=serializers.CharField()),
                    "code": serializers.CharField(required=False, help_text=f"{NOT_READY_CODE} when not ready"),
                },
            )
            for status in (200, 503)
        },
    )
    def get(self, request: Request) -> Response:
        checks: dict[str, Callable[[], None]] = {"database": check_database, "broker": check_broker}
        if settings.REDIS_URL:
            checks["redis"] = check_cache
        checks["backends"] = check_backends
        request_id = request_id_of(request)
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                check()
                results[name] = CHECK_OK
            except Exception:  # a failing dependency is reported, never raised
                # The detail (hosts, users, driver messages) is for the operator's log only: this
                # route answers anyone, without a key.
                logger.warning("readyz check %s failed request_id=%s", name, request_id, exc_info=True)
                results[name] = CHECK_UNAVAILABLE
        failing = [name for name, result in results.items() if result != CHECK_OK]
        body = {
            "status": "degraded" if failing else "ok",
            "module": "scaiecho",
            "phase": settings.SCAIECHO_PHASE,
            "checks": results,
            "failing": failing,
            "meta": {"request_id": request_id},
        }
        if failing:
            body["code"] = NOT_READY_CODE
        return Response(body, status=503 if failing else 200)


# The same probes under the module prefix (contract section 0), for platform health aggregators:
# same answers, their own operation ids.
@extend_schema_view(get=extend_schema(operation_id="module_healthz"))
class ModuleHealthzApi(HealthzApi):
    pass


@extend_schema_view(get=extend_schema(operation_id="module_readyz"))
class ModuleReadyzApi(ReadyzApi):
    pass
