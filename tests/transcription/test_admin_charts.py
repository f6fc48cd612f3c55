"""The admin's front page and the dashboard's charts: audio minutes per day per tenant, jobs by
outcome and latency percentiles, with the numbers seeded here, tenant-scoped for staff, and drawn
in a real browser (headless Chromium) with a screenshot."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from tenants.models import StaffTenant, UsageRecord
from tests.factories import TenantFactory
from tests.transcription.test_admin import JOBS_URL, make_job, make_worker

pytestmark = pytest.mark.django_db

CHROMIUM = "/usr/bin/chromium"


def day_at(days_ago: int, hour: int = 12) -> datetime:
    today = timezone.now().astimezone(UTC).date()
    return datetime.combine(today - timedelta(days=days_ago), datetime.min.time(), tzinfo=UTC) + timedelta(hours=hour)


@pytest.fixture
def seeded() -> dict[str, object]:
    """acme: 3 + 1.5 minutes two days ago, 6 minutes today; globex: 2 minutes two days ago and
    usage 40 days ago (outside the window). acme's jobs yesterday took 1..10 s (so p50 5.5 s,
    p90 9.1 s, p99 9.91 s); plus a failed, a queued and a running job of acme and a failed one of globex."""
    acme, globex = TenantFactory(slug="acme"), TenantFactory(slug="globex")
    for tenant, ms, when in [
        (acme, 180_000, day_at(2, 9)),
        (acme, 90_000, day_at(2, 15)),
        (acme, 360_000, day_at(0, 0)),
        (globex, 120_000, day_at(2, 10)),
        (globex, 600_000, day_at(40)),
    ]:
        UsageRecord.objects.create(tenant=tenant, backend="A", kind="batch", audio_duration_ms=ms, cost=0, created_at=when)
    done = day_at(1, 10)
    for seconds in range(1, 11):
        make_job(tenant=acme, status="completed", backend_used="A", created_at=done - timedelta(seconds=seconds), completed_at=done)
    make_job(tenant=acme, status="failed", error_code="BACKEND_ERROR", completed_at=done)
    make_job(tenant=acme, status="queued")
    make_job(tenant=acme, status="running")
    make_job(tenant=globex, status="failed", error_code="UNSUPPORTED_MEDIA", completed_at=done)
    return {"acme": acme, "globex": globex}


def bars(page: str, chart: str) -> list[dict[str, str]]:
    """The data attributes of each bar or point of one chart."""
    section = re.search(rf'<figure class="dashboard-chart" id="chart-{chart}".*?</figure>', page, re.S)
    assert section, f"chart {chart} not on the page"
    shapes = re.findall(r'<(?:rect class="bar"|circle class="point")((?: data-[a-z]+="[^"]*")+)', section.group(0))
    return [dict(re.findall(r'data-([a-z]+)="([^"]*)"', attributes)) for attributes in shapes]


def iso(days_ago: int) -> str:
    return day_at(days_ago).date().isoformat()


def test_charts_show_the_seeded_numbers(admin_client, seeded):
    page = admin_client.get(JOBS_URL).content.decode()

    audio = sorted((bar["tenant"], bar["day"], bar["minutes"]) for bar in bars(page, "audio-minutes"))
    assert audio == sorted([("acme", iso(0), "6.00"), ("acme", iso(2), "4.50"), ("globex", iso(2), "2.00")])
    outcomes = {bar["outcome"]: int(bar["count"]) for bar in bars(page, "job-outcomes")}
    assert outcomes == {"completed": 10, "failed": 2, "running": 1, "queued": 1}
    latency = {bar["series"]: (bar["day"], bar["seconds"], bar["jobs"]) for bar in bars(page, "job-latency")}
    assert latency == {"p50": (iso(1), "5.50", "10"), "p90": (iso(1), "9.10", "10"), "p99": (iso(1), "9.91", "10")}
    assert "acme, " + iso(2) + ": 4.50 audio minutes" in page  # the tooltip


def test_staff_see_only_their_tenants_in_the_charts(client, seeded):
    user = User.objects.create_user("acme-ops", password="x", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label__in=["transcription", "tenants", "speakers"]))
    StaffTenant.objects.create(user=user, tenant=seeded["acme"])
    client.force_login(user)
    page = client.get(JOBS_URL).content.decode()
    assert {bar["tenant"] for bar in bars(page, "audio-minutes")} == {"acme"}
    assert {bar["outcome"]: int(bar["count"]) for bar in bars(page, "job-outcomes")}["failed"] == 1


def test_empty_charts_say_so(admin_client):
    page = admin_client.get(JOBS_URL).content.decode()
    assert "No usage in these days." in page
    assert "No completed jobs in these days." in page
    assert bars(page, "audio-minutes") == []


def test_the_admin_is_scaiecho_and_its_front_page_leads_to_operations(admin_client, client):
    make_worker("batch@alive", expires_in=timedelta(seconds=20))
    make_worker("batch@gone", expires_in=timedelta(seconds=-1))
    page = admin_client.get("/admin/").content.decode()
    assert "<title>ScaiEcho administration | ScaiEcho</title>" in page
    assert 'id="site-name"><a href="/admin/">ScaiEcho</a>' in page
    assert "Django administration" not in page
    links = dict(re.findall(r'<a id="link-([a-z-]+)" href="([^"]+)"', page))
    assert links == {
        "dashboard": JOBS_URL + "#transcription-dashboard",
        "consent-review": "/admin/speakers/speaker/?review=pending",
        "live-workers": "/admin/transcription/speechworker/?alive=yes",
    }
    workers = admin_client.get(links["live-workers"]).content.decode()
    assert "batch@alive" in workers
    assert "batch@gone" not in workers
    assert '<a href="/admin/">ScaiEcho</a>' in client.get("/admin/login/").content.decode()  # signed out


def test_a_staff_user_without_permissions_gets_no_operations_links(client):
    user = User.objects.create_user("nobody", password="x", is_staff=True)
    client.force_login(user)
    page = client.get("/admin/").content.decode()
    assert 'id="scaiecho-operations"' not in page


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_dashboard_charts_in_a_real_browser(live_server, seeded, tmp_path: Path, monkeypatch):
    # Playwright's sync API runs an event loop in this thread; the ORM here is plain sync code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    import playwright.sync_api as playwright_sync

    User.objects.create_superuser("operator", password="operator-password-1")
    screenshot = tmp_path / "dashboard.png"
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1800})
            page.goto(f"{live_server.url}/admin/login/?next=/admin/")
            page.fill("#id_username", "operator")
            page.fill("#id_password", "operator-password-1")
            page.click("input[type=submit]")
            page.wait_for_selector("#scaiecho-operations")
            assert page.inner_text("#site-name").strip() == "ScaiEcho"
            page.click("#link-dashboard")
            page.wait_for_selector("#chart-audio-minutes svg rect.bar")
            page.locator("#dashboard-charts").screenshot(path=str(screenshot))

            audio = page.eval_on_selector_all(
                "#chart-audio-minutes rect.bar",
                "els => els.map(e => [e.dataset.tenant, e.dataset.minutes, e.getBoundingClientRect().height])",
            )
            points = page.eval_on_selector_all(
                "#chart-job-latency circle.point", "els => els.map(e => [e.dataset.series, e.dataset.seconds])"
            )
            outcomes = page.eval_on_selector_all(
                "#chart-job-outcomes rect.bar", "els => els.map(e => [e.dataset.outcome, e.dataset.count])"
            )
        finally:
            browser.close()

    assert screenshot.stat().st_size > 10_000
    print(f"dashboard screenshot: {screenshot}")
    assert sorted((tenant, minutes) for tenant, minutes, _ in audio) == [("acme", "4.50"), ("acme", "6.00"), ("globex", "2.00")]
    heights = {minutes: height for _, minutes, height in audio}
    # Drawn to scale: 6 minutes is three times as tall as 2.
    assert heights["6.00"] == pytest.approx(3 * heights["2.00"], rel=0.05)
    assert sorted(points) == [["p50", "5.50"], ["p90", "9.10"], ["p99", "9.91"]]
    assert dict(outcomes) == {"completed": "10", "failed": "2", "running": "1", "queued": "1"}
