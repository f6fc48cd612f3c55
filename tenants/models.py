"""Tenants, the people in them, their API keys, their backend policy, and the audit trail."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

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
