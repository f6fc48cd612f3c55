"""Tenants, the people in them, their API keys, their backend policy, and the audit trail."""

from __future__ import annotations

import hashlib
import uuid
from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

API_KEY_PREFIX = "sgk_"


def api_key_hash(raw_key: str) -> str:
    """The SHA-256 a key is stored and looked up by (the key itself is never stored)."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


# The contract's four permissions and the role defaults, exactly.
PERM_TRANSCRIBE = "scaiecho:transcribe"
PERM_DIARIZE = "scaiecho:diarize"
PERM_ENROLL = "scaiecho:enroll"
PERM_ADMIN = "scaiecho:admin"
ALL_PERMISSIONS = (PERM_TRANSCRIBE, PERM_DIARIZE, PERM_ENROLL, PERM_ADMIN)


class Role(models.TextChoices):
    TENANT_ADMIN = "tenant_admin", "Tenant admin"
    TENANT_USER = "tenant_user", "Tenant user"
    TENANT_VIEWER = "tenant_viewer", "Tenant viewer"


ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    Role.TENANT_ADMIN: frozenset(ALL_PERMISSIONS),
    Role.TENANT_USER: frozenset(),
    Role.TENANT_VIEWER: frozenset({PERM_TRANSCRIBE}),
}


class Tenant(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    tier = models.CharField(max_length=50, default="default", help_text="Selects the policy defaults.")
    scaiecho_enabled = models.BooleanField("ScaiEcho module enabled", default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="scaiecho_memberships")
    role = models.CharField(max_length=20, choices=Role.choices, default=Role.TENANT_VIEWER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "user"], name="uniq_membership_tenant_user")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


class PermissionGrant(models.Model):
    """An explicit permission on top of the member's role."""

    membership = models.ForeignKey(Membership, on_delete=models.CASCADE, related_name="grants")
    permission = models.CharField(max_length=40, choices=[(p, p) for p in ALL_PERMISSIONS])
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["membership", "permission"], name="uniq_grant_membership_permission")
        ]

    def __str__(self) -> str:
        return self.permission


class ApiKey(models.Model):
    """A bearer key of one member. Only a SHA-256 hash and the last four characters are stored."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    membership = models.ForeignKey(Membership, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    last_four = models.CharField(max_length=4, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name or 'key'} (sgk_…{self.last_four})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class StaffTenant(models.Model):
    """Binds a staff user to a tenant whose rows they may see and manage in the admin.

    Staff see only the tenants they are bound to (superusers see all); ``consent_custodian``
    makes them a consent custodian of this tenant alone (reviewing enrollments, playing consent
    recordings, erasing speakers), on top of the ``speakers.review_consent`` model permission.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="scaiecho_staff_tenants")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="staff")
    consent_custodian = models.BooleanField(
        default=False, help_text="May review consent, play consent recordings and erase speakers of this tenant."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant__slug", "user__username"]
        verbose_name = "staff tenant binding"
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="uniq_staff_tenant_user_tenant")]

    def __str__(self) -> str:
        return f"{self.user} on {self.tenant}{' (custodian)' if self.consent_custodian else ''}"


class Backend(models.TextChoices):
    A = "A", "A: self-hosted Whisper workers"
    B = "B", "B: managed relay"


class AllowedBackends(models.TextChoices):
    A = "A", "A only"
    B = "B", "B only"
    AB = "AB", "A and B"
    BA = "BA", "B and A"


class TenantPolicy(models.Model):
    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="policy")
    allowed_backends = models.CharField(max_length=2, choices=AllowedBackends.choices)
    default_backend = models.CharField(max_length=1, choices=Backend.choices)
    speaker_review_required = models.BooleanField(
        "speaker enrollments need a consent review",
        default=False,
        help_text="Verified enrollments wait as pending_review until a custodian approves them in the admin.",
    )
    # Webhooks (contract section 8): the destination of jobs that name none, and the signing
    # secret, encrypted (``tenants.webhooks``); the secret itself is shown once, when made.
    webhook_url = models.CharField(
        "default webhook URL",
        max_length=2048,
        blank=True,
        help_text="Called when a job that names no webhook_url completes or fails.",
    )
    webhook_secret_encrypted = models.BinaryField(null=True, blank=True, editable=False)
    webhook_secret_created_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "tenant policies"

    def __str__(self) -> str:
        return f"{self.tenant}: {self.allowed_backends}/{self.default_backend}"


class AuditQuerySet(models.QuerySet["AuditEvent"]):
    def update(self, **kwargs: object) -> int:
        raise TypeError("Audit rows are append-only.")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise TypeError("Audit rows are append-only.")


class AuditEvent(models.Model):
    """An append-only record of a mutating or permission-gated call.

    The tenant and actor are copied as plain values, not foreign keys, so the row outlives them
    and nothing ever has to update it. PostgreSQL also refuses UPDATE and DELETE with a trigger
    (see the migration), so not even raw SQL edits the trail.
    """

    class Outcome(models.TextChoices):
        SUCCESS = "SUCCESS"
        FAILURE = "FAILURE"

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    tenant_id = models.UUIDField(null=True, blank=True, db_index=True)
    tenant_slug = models.CharField(max_length=100, blank=True)
    actor_id = models.BigIntegerField(null=True, blank=True)
    actor_username = models.CharField(max_length=150, blank=True)
    api_key_id = models.UUIDField(null=True, blank=True)
    action = models.CharField(max_length=100, db_index=True)
    resource_type = models.CharField(max_length=100, blank=True)
    resource_id = models.CharField(max_length=100, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=512, blank=True)
    outcome = models.CharField(max_length=7, choices=Outcome.choices)
    request_id = models.CharField(max_length=128, blank=True, db_index=True)
    details = models.JSONField(default=dict, blank=True)

    objects = AuditQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.action} {self.outcome}"

    def save(self, *args: object, **kwargs: object) -> None:
        if not self._state.adding:
            raise TypeError("Audit rows are append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        raise TypeError("Audit rows are append-only.")


class UsageKind(models.TextChoices):
    BATCH = "batch", "Batch"
    STREAM = "stream", "Stream"


class UsageRecord(models.Model):
    """One transcription's metered usage: a batch job or a stream session.

    PROTECT on the tenant: a tenant with billed usage is not deleted by accident (switch its
    module off instead). Users and keys may go; the record keeps the tenant and the numbers.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="usage_records")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="scaiecho_usage"
    )
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_records")
    backend = models.CharField(max_length=1, choices=Backend.choices)
    kind = models.CharField(max_length=10, choices=UsageKind.choices)
    audio_duration_ms = models.PositiveBigIntegerField()
    latency_ms = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=12, decimal_places=6)
    reference = models.CharField(max_length=100, blank=True, help_text="The job id or stream session id.")
    # A default rather than auto_now_add, so that imports and tests can place a record in time.
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "created_at"], name="usage_tenant_created_idx")]
        constraints = [
            # One record per job or stream session, so a redelivered task cannot bill twice.
            models.UniqueConstraint(
                fields=["tenant", "kind", "reference"],
                condition=~models.Q(reference=""),
                name="uniq_usage_tenant_kind_reference",
            )
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.kind} {self.backend} {self.audio_duration_ms} ms"


class BudgetPeriod(models.TextChoices):
    DAILY = "daily", "Daily (UTC day)"
    WEEKLY = "weekly", "Weekly (ISO week, from Monday UTC)"
    MONTHLY = "monthly", "Monthly (calendar month, UTC)"
    TOTAL = "total", "Total (all time)"


class BudgetAction(models.TextChoices):
    BLOCK = "block", "Block (429 BUDGET_EXCEEDED)"
    NOTIFY = "notify", "Notify only"


class TenantBudget(models.Model):
    """A limit on a tenant's usage in a calendar period. All of a tenant's active budgets apply."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budgets")
    period = models.CharField(max_length=10, choices=BudgetPeriod.choices)
    limit_audio_seconds = models.PositiveBigIntegerField(null=True, blank=True)
    limit_cost = models.DecimalField(
        max_digits=12, decimal_places=6, null=True, blank=True, validators=[MinValueValidator(Decimal("0"))]
    )
    hard_action = models.CharField(max_length=10, choices=BudgetAction.choices, default=BudgetAction.BLOCK)
    soft_limit_ratio = models.DecimalField(
        max_digits=3,
        decimal_places=2,
        default=Decimal("0.80"),
        validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("1"))],
        help_text="A fraction of the limit; crossing it writes a budget.soft_limit audit row once per period.",
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant__slug", "period", "pk"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(limit_audio_seconds__isnull=False) | models.Q(limit_cost__isnull=False),
                name="budget_has_a_limit",
                violation_error_message="Set a limit in audio seconds, a cost limit, or both.",
            ),
            models.CheckConstraint(
                condition=models.Q(soft_limit_ratio__gte=0, soft_limit_ratio__lte=1),
                name="budget_soft_limit_ratio_0_1",
                violation_error_message="The soft limit ratio must lie between 0 and 1.",
            ),
        ]

    def __str__(self) -> str:
        limits = []
        if self.limit_audio_seconds is not None:
            limits.append(f"{self.limit_audio_seconds} s")
        if self.limit_cost is not None:
            limits.append(f"cost {self.limit_cost.normalize():f}")
        return f"{self.tenant} {self.period} {' / '.join(limits)} ({self.hard_action})"
