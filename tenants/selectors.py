"""Reads for tenants and keys. Tenant scoping lives here so that no view can forget it."""

from __future__ import annotations

import uuid

from django.db.models import Q, QuerySet

from scaiecho_site import errors
from tenants.models import ROLE_PERMISSIONS, ApiKey, Membership


def api_key_by_hash(*, key_hash: str) -> ApiKey | None:
    """An active key with its member, user and tenant, or ``None``."""
    return (
        ApiKey.objects.select_related("membership__tenant", "membership__user")
        .filter(key_hash=key_hash, revoked_at__isnull=True)
        .first()
    )


def api_keys_matching(*, reference: str) -> list[ApiKey]:
    """Keys an operator may mean by ``reference``: a full key, a key id, or a unique id prefix."""
    from tenants.services import api_key_hash

    if reference.startswith("sgk_"):
        return list(ApiKey.objects.filter(key_hash=api_key_hash(reference)))
    try:
        return list(ApiKey.objects.filter(pk=uuid.UUID(reference)))
    except ValueError:
        pass
    prefix = reference.lower().replace("-", "")
    if len(prefix) < 6:
        return []
    # UUIDs are stored as 32 hex digits on SQLite and as uuid on PostgreSQL; compare as text.
    candidates = ApiKey.objects.filter(Q(id__startswith=reference.lower()) | Q(id__startswith=prefix))
    return list(candidates[:2])


def membership_permissions(*, membership: Membership) -> frozenset[str]:
    """The role's permissions plus the member's explicit grants."""
    granted = {grant.permission for grant in membership.grants.all()}
    return ROLE_PERMISSIONS.get(membership.role, frozenset()) | granted


def api_keys_of_tenant(*, tenant_id: uuid.UUID) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(membership__tenant_id=tenant_id).select_related("membership__user", "membership__tenant")


def api_key_of_tenant(*, tenant_id: uuid.UUID, key_id: str) -> ApiKey:
    """One key of the tenant; any other id, including another tenant's, is simply not found."""
    try:
        return api_keys_of_tenant(tenant_id=tenant_id).get(pk=uuid.UUID(key_id))
    except (ValueError, ApiKey.DoesNotExist) as exc:
        raise errors.NotFound("No API key with that id in this tenant.") from exc
