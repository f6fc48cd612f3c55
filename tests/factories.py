"""Factories for tenants, members and keys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import factory
from django.contrib.auth import get_user_model

from tenants.context import system_actor
from tenants.models import (
    ApiKey,
    BudgetAction,
    BudgetPeriod,
    Membership,
    PermissionGrant,
    Role,
    Tenant,
    TenantBudget,
    UsageKind,
    UsageRecord,
)
from tenants.services import api_key_create, usage_cost
from transcription.models import TranscriptionJob
from transcription.storage import stage_upload


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant

    name = factory.Sequence(lambda n: f"Tenant {n}")
    slug = factory.Sequence(lambda n: f"tenant-{n}")


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"user{n}")


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    tenant = factory.SubFactory(TenantFactory)
    user = factory.SubFactory(UserFactory)
    role = Role.TENANT_VIEWER


@dataclass
class IssuedKey:
    key: ApiKey
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    @property
    def tenant(self) -> Tenant:
        return self.key.membership.tenant

    @property
    def membership(self) -> Membership:
        return self.key.membership


class KeyFactory:
    @staticmethod
    def issue(
        *,
        role: str = Role.TENANT_ADMIN,
        tenant: Tenant | None = None,
        membership: Membership | None = None,
        grants: Iterable[str] = (),
    ) -> IssuedKey:
        if membership is None:
            membership = MembershipFactory(role=role, **({"tenant": tenant} if tenant else {}))
        for permission in grants:
            PermissionGrant.objects.create(membership=membership, permission=permission)
        key, secret = api_key_create(membership=membership, name="test", ctx=system_actor())
        return IssuedKey(key=key, secret=secret)


class UsageRecordFactory(factory.django.DjangoModelFactory):
    """A metered transcription; priced here as the service would (B at 0.006 per minute by default)."""

    class Meta:
        model = UsageRecord

    tenant = factory.SubFactory(TenantFactory)
    backend = "B"
    kind = UsageKind.BATCH
    audio_duration_ms = 60_000
    latency_ms = 500
    cost = factory.LazyAttribute(lambda o: usage_cost(backend=o.backend, audio_duration_ms=o.audio_duration_ms))
    reference = factory.Sequence(lambda n: f"job-{n}")


class TenantBudgetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TenantBudget

    tenant = factory.SubFactory(TenantFactory)
    period = BudgetPeriod.DAILY
    limit_audio_seconds = 3600
    limit_cost = None
    hard_action = BudgetAction.BLOCK


def staged_job(key: IssuedKey, wav: bytes) -> TranscriptionJob:
    """An async job as ``POST /transcribe`` leaves it: staged audio and a queued row (no task sent)."""
    job = TranscriptionJob(
        tenant=key.tenant, user=key.membership.user, api_key=key.key, is_async=True,
        audio_sha256="0" * 64, audio_bytes=len(wav), audio_ext="wav",
    )
    job.staged_path = stage_upload(job_id=str(job.id), ext="wav", data=wav)
    job.save()
    return job
