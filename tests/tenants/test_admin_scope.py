"""A tenant-scoped admin: staff bound to tenant A see and manage only A's rows (superusers see
all), custody of consent is granted per tenant, and admin changes to roles, grants, keys, module
switches and staff bindings write audit rows."""

from __future__ import annotations

import hashlib
import io
import wave

import numpy as np
import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from speakers.models import ConsentRecord, ErasureAudit, Speaker
from speakers.services import recording_store
from tenants.models import (
    ApiKey,
    AuditEvent,
    Membership,
    PermissionGrant,
    Role,
    StaffTenant,
    Tenant,
    TenantBudget,
    TenantPolicy,
)
from tests.factories import KeyFactory, TenantFactory, UsageRecordFactory
from transcription.models import TranscriptionJob

pytestmark = pytest.mark.django_db

OUR_APPS = ("tenants", "speakers", "transcription")


def wav_bytes() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes((np.sin(np.arange(16000) / 10) * 8000).astype("<i2").tobytes())
    return out.getvalue()


@pytest.fixture(autouse=True)
def _own_media_root(settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path / "media")


def make_tenant(slug: str) -> dict:
    """A tenant with a member's key, a policy, a budget, usage, a finished job and a speaker
    whose consent recording is stored."""
    tenant = TenantFactory(slug=slug, name=f"{slug.title()} Inc")
    issued = KeyFactory.issue(role=Role.TENANT_ADMIN, tenant=tenant)
    TenantPolicy.objects.create(tenant=tenant, allowed_backends="AB", default_backend="B")
    budget = TenantBudget.objects.create(tenant=tenant, period="daily", limit_audio_seconds=60)
    UsageRecordFactory(tenant=tenant, reference=f"usage-{slug}")
    job = TranscriptionJob.objects.create(
        tenant=tenant,
        user=issued.membership.user,
        status=TranscriptionJob.Status.COMPLETED,
        audio_sha256="0" * 64,
        audio_bytes=10,
        audio_ext="wav",
        transcript=f"secret words of {slug}",
    )
    speaker = Speaker.objects.create(
        tenant=tenant, display_name=f"Voice of {slug}", language_primary="en", status=Speaker.Status.READY
    )
    audio = wav_bytes()
    ConsentRecord.objects.create(
        speaker=speaker,
        full_name=f"Person of {slug}",
        stated_purpose="captions",
        consent_text="I agree",
        reference_path=recording_store(speaker_id=speaker.pk, which="reference", data=audio),
        consent_path=recording_store(speaker_id=speaker.pk, which="consent", data=audio),
        reference_sha256=hashlib.sha256(audio).hexdigest(),
        consent_sha256=hashlib.sha256(audio).hexdigest(),
    )
    return {"tenant": tenant, "key": issued.key, "membership": issued.membership, "budget": budget, "job": job, "speaker": speaker}


@pytest.fixture
def acme():
    return make_tenant("acme")


@pytest.fixture
def globex():
    return make_tenant("globex")


def staff_user(username: str, *, tenants: list[Tenant], custodian_of: list[Tenant] = ()) -> User:
    """A staff user with every model permission of our apps, bound to ``tenants``."""
    user = User.objects.create_user(username, password="x", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label__in=OUR_APPS))
    for tenant in tenants:
        StaffTenant.objects.create(user=user, tenant=tenant, consent_custodian=tenant in custodian_of)
    return user


@pytest.fixture
def acme_staff(client, acme):
    user = staff_user("acme-staff", tenants=[acme["tenant"]], custodian_of=[acme["tenant"]])
    client.force_login(user)
    return user


def admin_url(obj, view: str = "change") -> str:
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=[obj.pk])


def listing(client, model) -> str:
    opts = model._meta
    response = client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
    assert response.status_code == 200
    return response.content.decode()


def test_staff_lists_show_only_their_tenants_rows(client, acme, globex, acme_staff):
    tenants = listing(client, Tenant)
    assert "acme" in tenants
    assert "globex" not in tenants
    for model in (Membership, ApiKey, TenantPolicy, TenantBudget, TranscriptionJob, Speaker):
        page = listing(client, model)
        assert "globex" not in page, model  # not in rows, and not offered as a list filter either
    jobs = listing(client, TranscriptionJob)
    assert str(acme["job"].pk) in jobs
    assert str(globex["job"].pk) not in jobs
    speakers = listing(client, Speaker)
    assert "Voice of acme" in speakers
    assert "Voice of globex" not in speakers
    # The usage summary counts only the staff user's tenants.
    summary = client.get(reverse("admin:tenants_usagerecord_summary")).content.decode()
    assert "acme" in summary
    assert "globex" not in summary


def test_the_audit_trail_and_erasure_audits_are_scoped(client, acme, globex, acme_staff, admin_client):
    AuditEvent.objects.create(tenant_id=globex["tenant"].pk, tenant_slug="globex", action="thing.globex", outcome="SUCCESS")
    AuditEvent.objects.create(tenant_id=acme["tenant"].pk, tenant_slug="acme", action="thing.acme", outcome="SUCCESS")
    trail = listing(client, AuditEvent)
    assert "thing.acme" in trail
    assert "thing.globex" not in trail
    assert "globex" not in trail  # the tenant_slug filter lists only visible values
    ErasureAudit.objects.create(tenant_id=globex["tenant"].pk, tenant_slug="globex", speaker_id=globex["speaker"].pk, via="api")
    assert str(globex["speaker"].pk) not in listing(client, ErasureAudit)
    # A superuser sees every tenant.
    everything = admin_client.get(reverse("admin:tenants_auditevent_changelist")).content.decode()
    assert "thing.acme" in everything
    assert "thing.globex" in everything


def test_another_tenants_object_urls_answer_404(client, acme, globex, acme_staff):
    others = [globex["tenant"], globex["membership"], globex["key"], globex["budget"], globex["job"], globex["speaker"]]
    others.append(globex["tenant"].policy)
    for obj in others:
        for view in ("change", "history"):
            assert client.get(admin_url(obj, view)).status_code == 404, (obj, view)
    assert client.get(admin_url(globex["membership"], "delete")).status_code == 404
    assert client.post(admin_url(globex["membership"], "delete"), {"post": "yes"}).status_code == 404
    assert Membership.objects.filter(pk=globex["membership"].pk).exists()
    # Their own rows open as before.
    for obj in (acme["tenant"], acme["membership"], acme["key"], acme["job"], acme["speaker"]):
        assert client.get(admin_url(obj)).status_code == 200, obj


def test_foreign_key_choices_and_saves_stay_in_the_staff_users_tenants(client, acme, globex, acme_staff):
    add_key = client.get(reverse("admin:tenants_apikey_add")).content.decode()
    assert f'value="{acme["membership"].pk}"' in add_key
    assert f'value="{globex["membership"].pk}"' not in add_key
    keys_before = ApiKey.objects.count()
    refused = client.post(reverse("admin:tenants_apikey_add"), {"membership": globex["membership"].pk, "name": "sneaky"})
    assert refused.status_code == 200
    assert "Select a valid choice" in refused.content.decode()
    assert ApiKey.objects.count() == keys_before  # no key issued into another tenant

    refused = client.post(
        reverse("admin:tenants_tenantbudget_add"),
        {"tenant": globex["tenant"].pk, "period": "daily", "limit_audio_seconds": 1, "hard_action": "block", "soft_limit_ratio": "0.8", "is_active": "on"},
    )
    assert "Select a valid choice" in refused.content.decode()
    assert not TenantBudget.objects.filter(tenant=globex["tenant"], limit_audio_seconds=1).exists()
    # Moving their own budget into another tenant is refused the same way.
    moved = client.post(
        admin_url(acme["budget"]),
        {"tenant": globex["tenant"].pk, "period": "daily", "limit_audio_seconds": 60, "hard_action": "block", "soft_limit_ratio": "0.8", "is_active": "on"},
    )
    assert "Select a valid choice" in moved.content.decode()
    assert TenantBudget.objects.get(pk=acme["budget"].pk).tenant == acme["tenant"]
    # Staff neither create tenants (they would fall outside every scope) nor bind staff to tenants.
    assert client.get(reverse("admin:tenants_tenant_add")).status_code == 403
    assert client.get(reverse("admin:tenants_stafftenant_changelist")).status_code == 403


def test_actions_touch_only_the_staff_users_tenants(client, acme, globex, acme_staff):
    response = client.post(
        reverse("admin:tenants_apikey_changelist"),
        {"action": "revoke_selected", "_selected_action": [str(acme["key"].pk), str(globex["key"].pk)]},
    )
    assert response.status_code == 302
    assert ApiKey.objects.get(pk=acme["key"].pk).revoked_at is not None
    assert ApiKey.objects.get(pk=globex["key"].pk).revoked_at is None


def test_custody_is_per_tenant(client, acme, globex, acme_staff):
    mine, theirs = acme["speaker"], globex["speaker"]
    play = reverse("admin:speakers_speaker_recording", args=[mine.pk, "consent"])
    assert client.get(play).status_code == 200
    assert AuditEvent.objects.filter(action="speaker.recording_played", resource_id=str(mine.pk), tenant_id=acme["tenant"].pk).exists()

    # Another tenant's speaker: not found, whatever the page.
    for name, args in (("recording", [theirs.pk, "consent"]), ("erase", [theirs.pk]), ("review", [theirs.pk])):
        url = reverse(f"admin:speakers_speaker_{name}", args=args)
        assert client.get(url).status_code == 404, name
        assert client.post(url, {"decision": "approve"}).status_code == 404, name
    assert not AuditEvent.objects.filter(action="speaker.recording_played", resource_id=str(theirs.pk)).exists()

    # The erase action with the other tenant's id slipped in erases only what is in scope.
    client.post(
        reverse("admin:speakers_speaker_changelist"),
        {"action": "erase_selected", "_selected_action": [str(theirs.pk)]},
    )
    assert Speaker.objects.get(pk=theirs.pk).status == Speaker.Status.READY
    assert ConsentRecord.objects.get(speaker=theirs).consent_path  # the recording is still there
    assert not ErasureAudit.objects.filter(speaker_id=theirs.pk).exists()


def test_staff_bound_without_custody_cannot_play_or_erase(client, acme, globex):
    # Custodian of globex, but only a viewer of acme.
    user = staff_user("mixed", tenants=[acme["tenant"], globex["tenant"]], custodian_of=[globex["tenant"]])
    client.force_login(user)
    speaker = acme["speaker"]
    assert client.get(admin_url(speaker)).status_code == 200
    assert client.get(reverse("admin:speakers_speaker_recording", args=[speaker.pk, "consent"])).status_code == 403
    assert client.post(reverse("admin:speakers_speaker_erase", args=[speaker.pk])).status_code == 403
    # A mixed selection is refused whole: nothing is erased.
    response = client.post(
        reverse("admin:speakers_speaker_changelist"),
        {"action": "erase_selected", "_selected_action": [str(globex["speaker"].pk), str(speaker.pk)]},
    )
    assert response.status_code == 403
    assert Speaker.objects.filter(status=Speaker.Status.ERASED).count() == 0
    # In globex, where the binding grants custody, the same user erases.
    client.post(reverse("admin:speakers_speaker_erase", args=[globex["speaker"].pk]))
    assert Speaker.objects.get(pk=globex["speaker"].pk).status == Speaker.Status.ERASED
    assert ErasureAudit.objects.get(speaker_id=globex["speaker"].pk).actor_username == "mixed"


def test_a_binding_without_the_model_permission_grants_no_custody(client, acme):
    user = User.objects.create_user("bare", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_speaker"))
    StaffTenant.objects.create(user=user, tenant=acme["tenant"], consent_custodian=True)
    client.force_login(user)
    assert client.get(reverse("admin:speakers_speaker_recording", args=[acme["speaker"].pk, "consent"])).status_code == 403


# --- Audit rows of admin changes ---------------------------------------------------------------


def audit(action: str) -> AuditEvent:
    return AuditEvent.objects.get(action=action)


def membership_form(membership: Membership, *, role: str, grants: list[tuple[int | None, str, bool]]) -> dict:
    data = {
        "tenant": membership.tenant.pk,
        "user": membership.user.pk,
        "role": role,
        "grants-TOTAL_FORMS": len(grants),
        "grants-INITIAL_FORMS": sum(1 for pk, _, _ in grants if pk),
        "grants-MIN_NUM_FORMS": 0,
        "grants-MAX_NUM_FORMS": 1000,
    }
    for index, (pk, permission, delete) in enumerate(grants):
        data[f"grants-{index}-id"] = pk or ""
        data[f"grants-{index}-membership"] = membership.pk
        data[f"grants-{index}-permission"] = permission
        if delete:
            data[f"grants-{index}-DELETE"] = "on"
    return data


def test_role_and_grant_changes_are_audited(client, acme, acme_staff):
    membership = Membership.objects.create(tenant=acme["tenant"], user=User.objects.create_user("bob"), role=Role.TENANT_VIEWER)
    response = client.post(
        admin_url(membership), membership_form(membership, role=Role.TENANT_ADMIN, grants=[(None, "scaiecho:enroll", False)])
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    role = audit("membership.role_change")
    assert (role.tenant_id, role.actor_username) == (acme["tenant"].pk, "acme-staff")
    assert role.details | {"via": "admin"} == {"username": "bob", "before": "tenant_viewer", "after": "tenant_admin", "via": "admin"}
    grant = PermissionGrant.objects.get(membership=membership)
    added = audit("permission_grant.create")
    assert (added.resource_id, added.details["permission"], added.tenant_id) == (str(grant.pk), "scaiecho:enroll", acme["tenant"].pk)

    # Saving again with no change writes nothing; removing the grant is audited.
    client.post(admin_url(membership), membership_form(membership, role=Role.TENANT_ADMIN, grants=[(grant.pk, "scaiecho:enroll", False)]))
    assert AuditEvent.objects.filter(action__in=["membership.role_change", "permission_grant.create"]).count() == 2
    client.post(admin_url(membership), membership_form(membership, role=Role.TENANT_ADMIN, grants=[(grant.pk, "scaiecho:enroll", True)]))
    assert not PermissionGrant.objects.filter(membership=membership).exists()
    assert audit("permission_grant.delete").resource_id == str(grant.pk)

    # Deleting the membership is audited with who it was.
    pk = membership.pk
    client.post(admin_url(membership, "delete"), {"post": "yes"})
    assert not Membership.objects.filter(pk=pk).exists()
    deleted = audit("membership.delete")
    assert (deleted.resource_id, deleted.details["username"], deleted.details["role"]) == (str(pk), "bob", "tenant_admin")


def test_module_switch_and_key_rename_are_audited(client, acme, acme_staff):
    tenant = acme["tenant"]
    form = {
        "name": tenant.name, "slug": tenant.slug, "tier": tenant.tier,
        "memberships-TOTAL_FORMS": 0, "memberships-INITIAL_FORMS": 0, "memberships-MIN_NUM_FORMS": 0, "memberships-MAX_NUM_FORMS": 1000,
    }  # fmt: skip
    response = client.post(admin_url(tenant), form)  # the checkbox left out: the module is switched off
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Tenant.objects.get(pk=tenant.pk).scaiecho_enabled is False
    switched = audit("tenant.module_disable")
    assert (switched.tenant_id, switched.details["before"], switched.details["after"]) == (tenant.pk, True, False)
    client.post(admin_url(tenant), {**form, "scaiecho_enabled": "on"})
    assert audit("tenant.module_enable").actor_username == "acme-staff"

    key = acme["key"]
    client.post(admin_url(key), {"name": "renamed"})
    renamed = audit("api_key.rename")
    assert (renamed.resource_id, renamed.details["before"], renamed.details["after"]) == (str(key.pk), "test", "renamed")


def test_a_membership_added_inline_on_the_tenant_page_is_audited(client, acme, acme_staff):
    tenant = acme["tenant"]
    carol = User.objects.create_user("carol")
    existing = acme["membership"]
    form = {
        "name": tenant.name, "slug": tenant.slug, "tier": tenant.tier, "scaiecho_enabled": "on",
        "memberships-TOTAL_FORMS": 2, "memberships-INITIAL_FORMS": 1, "memberships-MIN_NUM_FORMS": 0, "memberships-MAX_NUM_FORMS": 1000,
        "memberships-0-id": existing.pk, "memberships-0-tenant": tenant.pk, "memberships-0-user": existing.user.pk,
        "memberships-0-role": existing.role,
        "memberships-1-id": "", "memberships-1-tenant": tenant.pk, "memberships-1-user": carol.pk,
        "memberships-1-role": Role.TENANT_USER,
    }  # fmt: skip
    response = client.post(admin_url(tenant), form)
    assert response.status_code == 302, response.content.decode()[:3000]
    created = audit("membership.create")
    assert (created.details["username"], created.details["after"], created.tenant_id) == ("carol", "tenant_user", tenant.pk)
    assert not AuditEvent.objects.filter(action="membership.role_change").exists()  # the unchanged row wrote nothing


def test_staff_bindings_are_managed_by_superusers_and_audited(admin_client, acme):
    user = User.objects.create_user("dave", is_staff=True)
    response = admin_client.post(
        reverse("admin:tenants_stafftenant_add"), {"user": user.pk, "tenant": acme["tenant"].pk, "consent_custodian": "on"}
    )
    assert response.status_code == 302
    binding = StaffTenant.objects.get(user=user)
    created = audit("staff_tenant.create")
    assert (created.tenant_id, created.details["username"], created.details["consent_custodian"]) == (acme["tenant"].pk, "dave", True)
    admin_client.post(admin_url(binding), {"user": user.pk, "tenant": acme["tenant"].pk})
    changed = audit("staff_tenant.custodian_change")
    assert (changed.details["before"], changed.details["consent_custodian"]) == (True, False)
    admin_client.post(admin_url(binding, "delete"), {"post": "yes"})
    assert audit("staff_tenant.delete").details["username"] == "dave"
    assert not StaffTenant.objects.filter(user=user).exists()
