"""Enrollment faults (issue 11, point 6): no enrollment stays ``pending`` for good.

A broker that cannot take the enrollment answers 503 and ends it; an enrollment whose task was
lost is enqueued again by the sweep; tries are capped, so a recording that kills its worker every
time ends ``failed`` with its reason.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from speakers.models import ConsentEvent, Speaker
from speakers.services import enrollments_sweep, speaker_enrollment_run
from tenants.models import Role, TenantPolicy
from tests.factories import KeyFactory
from tests.speakers.voices import ALICE, SPEAKERS_URL, enroll
from tests.tenants.test_auth import assert_error
from tests.transcription.test_faults import broker_down  # noqa: F401 - a fixture


@pytest.fixture
def enroller():
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    return key


def make_speaker(key, **fields) -> Speaker:
    return Speaker.objects.create(tenant=key.tenant, display_name="Pat", language_primary="en", **fields)


def age(speaker: Speaker, seconds: float) -> None:
    Speaker.objects.filter(pk=speaker.pk).update(updated_at=timezone.now() - timedelta(seconds=seconds))


@pytest.mark.django_db(transaction=True)
def test_a_broker_outage_at_enrollment_answers_503_and_keeps_nothing(api, enroller, broker_down):  # noqa: F811
    response = enroll(api, enroller, ALICE)

    assert_error(response, 503, "SCAIECHO_QUEUE_UNAVAILABLE")
    # Nothing kept: no profile, no consent record, no recordings; the client may enroll again.
    assert not Speaker.objects.filter(tenant=enroller.tenant).exists()
    assert api.get(SPEAKERS_URL, headers=enroller.headers).json()["data"]["items"] == []


@pytest.mark.django_db
def test_an_enrollment_tried_too_often_fails_without_running(settings, enroller):
    settings.SCAIECHO_ENROLLMENT_MAX_ATTEMPTS = 2
    speaker = make_speaker(enroller, attempts=2, stage=Speaker.Stage.EMBEDDING)

    speaker_enrollment_run(speaker_id=str(speaker.pk))  # its third delivery

    speaker.refresh_from_db()
    assert (speaker.status, speaker.status_reasons) == ("failed", ["attempts_exhausted"])
    assert ConsentEvent.objects.filter(speaker_id=speaker.pk, kind=ConsentEvent.Kind.REJECTED).exists()


@pytest.mark.django_db(transaction=True)
def test_the_sweep_enqueues_a_lost_enrollment_again_and_ends_hopeless_ones(settings, enroller):
    settings.SCAIECHO_JOB_TIME_LIMIT_SECONDS = 60
    settings.SCAIECHO_JOB_MAX_QUEUED_SECONDS = 600
    settings.SCAIECHO_ENROLLMENT_MAX_ATTEMPTS = 3
    lost = make_speaker(enroller, attempts=1, stage=Speaker.Stage.EMBEDDING)
    worn_out = make_speaker(enroller, attempts=3, stage=Speaker.Stage.VERIFYING)
    never_taken = make_speaker(enroller, attempts=0, stage=Speaker.Stage.QUEUED)
    busy = make_speaker(enroller, attempts=1, stage=Speaker.Stage.EMBEDDING)
    age(lost, 61)
    age(worn_out, 61)
    age(never_taken, 601)
    age(busy, 30)

    assert enrollments_sweep() == 3

    rows = {s.pk: s for s in Speaker.objects.filter(tenant=enroller.tenant)}
    assert rows[lost.pk].status == "pending"  # enqueued again: its clock restarted
    assert timezone.now() - rows[lost.pk].updated_at < timedelta(seconds=10)
    assert (rows[worn_out.pk].status, rows[worn_out.pk].status_reasons) == ("failed", ["attempts_exhausted"])
    assert (rows[never_taken.pk].status, rows[never_taken.pk].status_reasons) == ("failed", ["queue_unavailable"])
    assert rows[busy.pk].status == "pending"
