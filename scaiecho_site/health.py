"""``/healthz`` (the process answers) and ``/readyz`` (it can do useful work)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from scaiecho_site.envelope import request_id_of
from tenants.services import backend_available

logger = logging.getLogger("scaiecho.health")


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
                    "checks": serializers.DictField(child=serializers.CharField()),
                    "failing": serializers.ListField(child=serializers.CharField()),
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
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                check()
                results[name] = "ok"
            except Exception as exc:  # a failing dependency is reported, never raised
                logger.warning("readyz check %s failed: %s", name, exc)
                results[name] = f"failing: {exc}"
        failing = [name for name, result in results.items() if result != "ok"]
        body = {
            "status": "degraded" if failing else "ok",
            "module": "scaiecho",
            "phase": settings.SCAIECHO_PHASE,
            "checks": results,
            "failing": failing,
            "meta": {"request_id": request_id_of(request)},
        }
        return Response(body, status=503 if failing else 200)
