"""The audit trail is append-only, in code and in the database."""

from __future__ import annotations

import pytest
from django.db import connection, transaction

from tenants.context import system_actor
from tenants.models import AuditEvent
from tenants.services import audit_record

pytestmark = pytest.mark.django_db


@pytest.fixture
def row() -> AuditEvent:
    return audit_record(ctx=system_actor(), action="test.event", resource_type="thing", resource_id="1")


def test_rows_cannot_be_changed_or_deleted_through_the_orm(row):
    row.action = "tampered"
    with pytest.raises(TypeError):
        row.save()
    with pytest.raises(TypeError):
        row.delete()
    with pytest.raises(TypeError):
        AuditEvent.objects.filter(pk=row.pk).update(action="tampered")
    with pytest.raises(TypeError):
        AuditEvent.objects.filter(pk=row.pk).delete()
    assert AuditEvent.objects.get(pk=row.pk).action == "test.event"


def test_database_refuses_raw_update_and_delete(row):
    for statement in ("UPDATE tenants_auditevent SET action = 'x' WHERE id = %s", "DELETE FROM tenants_auditevent WHERE id = %s"):
        with pytest.raises(Exception, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement, [row.pk])
    assert AuditEvent.objects.get(pk=row.pk).action == "test.event"


def test_rows_outlive_their_tenant(api, admin_key):
    api.get("/v1/modules/scaiecho/tenant-policy", headers=admin_key.headers)
    tenant_id = admin_key.tenant.pk
    admin_key.tenant.delete()
    assert AuditEvent.objects.filter(tenant_id=tenant_id, action="tenant_policy.read").exists()
