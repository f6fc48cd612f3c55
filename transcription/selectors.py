"""Reads: which speech backends can take work, and jobs as their owner may see them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import (
    Aggregate,
    Count,
    DurationField,
    Exists,
    ExpressionWrapper,
    F,
    FloatField,
    Max,
    Min,
    OuterRef,
    QuerySet,
    Sum,
)
from django.db.models.functions import Extract, TruncDate
from django.utils import timezone

from scaiecho_site import errors
from tenants.selectors import Reservation
from transcription.models import SpeechWorker, TranscriptionJob, TranscriptionPiece, WebhookDelivery

UNFINISHED = (TranscriptionJob.Status.QUEUED, TranscriptionJob.Status.RUNNING)
# How far back fair dispatch remembers when a tenant's finished jobs were served.
FAIR_SHARE_MEMORY = timedelta(hours=1)


def whisper_workers_alive(*, kind: str = SpeechWorker.Kind.BATCH) -> bool:
    """Backend A is available while at least one worker's heartbeat has not expired."""
    return SpeechWorker.objects.filter(kind=kind, expires_at__gt=timezone.now()).exists()


def relay_configured() -> bool:
    """Backend B is available when the relay's URL and key are configured."""
    return bool(settings.SCAIECHO_RELAY_BASE_URL and settings.SCAIECHO_RELAY_API_KEY)


def job_for_owner(*, job_id: str, tenant_id: uuid.UUID, user_id: int) -> TranscriptionJob:
    """A job visible only to the user who created it, in the same tenant; anyone else gets 404."""
    try:
        return TranscriptionJob.objects.get(pk=uuid.UUID(job_id), tenant_id=tenant_id, user_id=user_id)
    except (ValueError, TranscriptionJob.DoesNotExist) as exc:
        raise errors.NotFound("No transcription job with that id.") from exc


def queue_backlog() -> dict[str, int]:
    """Jobs waiting and running, for the admin dashboard."""
    counts = {status: 0 for status in (TranscriptionJob.Status.QUEUED, TranscriptionJob.Status.RUNNING)}
    for status in counts:
        counts[status] = TranscriptionJob.objects.filter(status=status).count()
    return counts


def jobs_reserved(*, tenant_id: Any, exclude_job_id: Any = None) -> Reservation:
    """What the tenant's unfinished (queued or running) jobs hold against its budgets; a finished
    job holds nothing, its usage record counts instead."""
    jobs = TranscriptionJob.objects.filter(tenant_id=tenant_id, status__in=UNFINISHED)
    if exclude_job_id is not None:
        jobs = jobs.exclude(pk=exclude_job_id)
    totals = jobs.aggregate(ms=Sum("reserved_audio_ms"), cost=Sum("reserved_cost"))
    return Reservation(audio_ms=totals["ms"] or 0, cost=totals["cost"] or Decimal("0"))


# --- Fair dispatch ---------------------------------------------------------------------------------


@dataclass
class TenantShare:
    """A tenant's unfinished work as the workers see it: tasks waiting, tasks running, and when
    one of them last started (``None``: none has yet)."""

    waiting: int = 0
    running: int = 0
    last_started: datetime | None = None

    def served(self, started: datetime | None) -> None:
        if started is not None and (self.last_started is None or started > self.last_started):
            self.last_started = started

    def ahead_of(self, other: TenantShare) -> bool:
        """Whether this tenant's waiting work should go before ``other``'s: it has fewer tasks
        running, or as many and has waited longer since it was last served."""
        never = datetime.min.replace(tzinfo=UTC)
        return (self.running, self.last_started or never) < (other.running, other.last_started or never)


def tenant_shares() -> dict[Any, TenantShare]:
    """Every tenant with unfinished work: its waiting and running tasks (a job not split, or a
    piece of a split one) and when it was last served (a task of its started, or a job of its
    finished within ``FAIR_SHARE_MEMORY``). Five grouped queries over unfinished and recently
    finished work only."""
    shares: dict[Any, TenantShare] = {}
    jobs = TranscriptionJob.objects.filter(status__in=UNFINISHED)
    unsplit = jobs.filter(~Exists(TranscriptionPiece.objects.filter(job=OuterRef("pk"))))
    for row in unsplit.order_by().values("tenant_id", "status").annotate(n=Count("id")):
        share = shares.setdefault(row["tenant_id"], TenantShare())
        if row["status"] == TranscriptionJob.Status.QUEUED:
            share.waiting += row["n"]
        else:
            share.running += row["n"]
    pieces = TranscriptionPiece.objects.filter(job__status__in=UNFINISHED)
    waiting_or_running = (TranscriptionPiece.Status.QUEUED, TranscriptionPiece.Status.RUNNING)
    for row in pieces.filter(status__in=waiting_or_running).order_by().values("job__tenant_id", "status").annotate(n=Count("id")):
        share = shares.setdefault(row["job__tenant_id"], TenantShare())
        if row["status"] == TranscriptionPiece.Status.QUEUED:
            share.waiting += row["n"]
        else:
            share.running += row["n"]
    for row in jobs.order_by().values("tenant_id").annotate(last=Max("started_at")):
        shares.setdefault(row["tenant_id"], TenantShare()).served(row["last"])
    for row in pieces.order_by().values("job__tenant_id").annotate(last=Max("started_at")):
        shares.setdefault(row["job__tenant_id"], TenantShare()).served(row["last"])
    # A job that finished lately served its tenant until it finished: without it, a tenant with
    # many short jobs would look unserved again between each two of them.
    finished = TranscriptionJob.objects.filter(
        tenant_id__in=list(shares), completed_at__gte=timezone.now() - FAIR_SHARE_MEMORY
    )
    for row in finished.order_by().values("tenant_id").annotate(last=Max("completed_at")):
        shares[row["tenant_id"]].served(row["last"])
    return shares


def dispatch_yields(*, tenant_id: Any) -> bool:
    """Whether a worker about to run a task of ``tenant_id`` should let another tenant go first:
    some other tenant has work waiting and is ahead of this one (:meth:`TenantShare.ahead_of`).

    Equal shares go in no particular order, so two tenants never wait for each other. Over time
    this gives the workers to tenants in turn, whatever the order of the broker's queue: one
    tenant's hundred pieces cannot keep another's short job waiting behind them.
    """
    shares = tenant_shares()
    mine = shares.get(tenant_id, TenantShare())
    return any(share.waiting and share.ahead_of(mine) for other, share in shares.items() if other != tenant_id)


# --- Operations: /metrics and the admin charts -----------------------------------------------------


def jobs_by_state_and_backend() -> dict[tuple[str, str], int]:
    """How many jobs there are in each state on each backend (``""``: not resolved yet): one
    grouped query."""
    rows = TranscriptionJob.objects.order_by().values("status", "backend_used").annotate(n=Count("id"))
    return {(row["status"], row["backend_used"]): row["n"] for row in rows}


def queue_depth() -> dict[str, int]:
    """Work waiting for a worker: queued jobs that are not split into pieces, and queued pieces."""
    unsplit = TranscriptionJob.objects.filter(status=TranscriptionJob.Status.QUEUED).filter(
        ~Exists(TranscriptionPiece.objects.filter(job=OuterRef("pk")))
    )
    pieces = TranscriptionPiece.objects.filter(
        status=TranscriptionPiece.Status.QUEUED, job__status__in=UNFINISHED
    )
    return {"job": unsplit.count(), "piece": pieces.count()}


def webhooks_pending(*, now: datetime | None = None) -> tuple[int, float]:
    """Webhook events still to be delivered (first attempt or a retry to come), and how long the
    oldest has waited in seconds (0 with none): a backlog that only grows means no webhook worker."""
    pending = WebhookDelivery.objects.filter(status=WebhookDelivery.Status.PENDING).order_by()
    counts = pending.aggregate(n=Count("id"), oldest=Min("created_at"))
    waited = ((now or timezone.now()) - counts["oldest"]).total_seconds() if counts["oldest"] else 0.0
    return counts["n"], max(0.0, waited)


def workers_alive(*, now: datetime | None = None) -> list[SpeechWorker]:
    """Speech and stream workers whose heartbeat has not expired."""
    return list(SpeechWorker.objects.filter(expires_at__gt=now or timezone.now()).order_by("kind", "worker_id"))


def jobs_by_outcome(*, jobs: QuerySet[TranscriptionJob], since: datetime) -> dict[str, int]:
    """The jobs created since ``since`` by status (every status, zeros included)."""
    counts = {status: 0 for status in TranscriptionJob.Status.values}
    for row in jobs.filter(created_at__gte=since).order_by().values("status").annotate(n=Count("id")):
        counts[row["status"]] = row["n"]
    return counts


LATENCY_PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class DailyLatency:
    """Percentiles of the time from upload to result (seconds) of the jobs completed on one UTC day."""

    day: date
    jobs: int
    seconds: dict[int, float]


class _PercentileCont(Aggregate):
    """PostgreSQL's ``percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)``."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"

    def __init__(self, expression: Any, *, fraction: float) -> None:
        super().__init__(expression, output_field=FloatField(), fraction=float(fraction))


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks, as ``percentile_cont`` computes it."""
    position = fraction * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def job_latency_per_day(*, jobs: QuerySet[TranscriptionJob], since: datetime) -> list[DailyLatency]:
    """p50, p90 and p99 of created-to-completed time per UTC day of completion, for the completed
    jobs among ``jobs`` since ``since``. PostgreSQL computes them in one grouped query; other
    databases (the embedded SQLite) get them computed here from the rows."""
    completed = jobs.filter(status=TranscriptionJob.Status.COMPLETED, completed_at__gte=since, completed_at__isnull=False)
    if connection.vendor == "postgresql":
        latency = Extract(
            ExpressionWrapper(F("completed_at") - F("created_at"), output_field=DurationField()), "epoch"
        )
        percentiles = {f"p{p}": _PercentileCont(latency, fraction=p / 100) for p in LATENCY_PERCENTILES}
        rows = (
            completed.annotate(day=TruncDate("completed_at", tzinfo=UTC))
            .order_by()
            .values("day")
            .annotate(n=Count("id"), **percentiles)
            .order_by("day")
        )
        return [
            DailyLatency(day=row["day"], jobs=row["n"], seconds={p: float(row[f"p{p}"]) for p in LATENCY_PERCENTILES})
            for row in rows
        ]
    per_day: dict[date, list[float]] = {}
    for created, done in completed.values_list("created_at", "completed_at"):
        per_day.setdefault(done.astimezone(UTC).date(), []).append((done - created).total_seconds())
    result = []
    for day in sorted(per_day):
        values = sorted(per_day[day])
        result.append(
            DailyLatency(day=day, jobs=len(values), seconds={p: _percentile(values, p / 100) for p in LATENCY_PERCENTILES})
        )
    return result
