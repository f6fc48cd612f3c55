"""``scripts/run`` as an operator uses it (issue 11, point 6): stopping it ends every process it
started within 10 s, even with a job running, and the job cut short is handed back: the next start
finishes it, billed once, and its webhook reaches the receiver through the webhook worker that
``scripts/run`` starts beside the speech worker."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from tests.tenants.test_startup import PYTHON, ROOT, clean_env, free_port
from tests.transcription.test_webhooks import WebhookReceiver
from tests.voices import synth_speech, word_error_rate

pytestmark = pytest.mark.slow

SPOKEN = (
    "Good morning everyone. Today we will review the quarterly budget and plan the next product release. "
    "Please send the report to the finance team before Friday, and keep a copy for the archive. "
    "The meeting on Thursday moves to the large room on the third floor, next to the kitchen. "
    "Our new colleague from the design team starts on Monday and will sit with the support group. "
    "The printer on the second floor is broken again, so use the one near the reception desk. "
    "Remember that the office closes early on Friday because of the building maintenance work. "
    "If you travel next week, book your train tickets through the usual company website. "
    "Lunch will be served in the garden if the weather stays as warm and sunny as it is today."
)


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (from /proc; zombies do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class RunScript:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.log = log.open("a")
        self.process = subprocess.Popen(
            ["bash", "scripts/run"], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pgid = self.process.pid

    def wait_healthy(self, base: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            time.sleep(0.5)
        raise AssertionError("scripts/run did not become ready:\n" + self.log_path.read_text()[-3000:])

    def terminate_group(self) -> float:
        """SIGTERM to the whole process group (what a service manager does); seconds until none is left."""
        started = time.monotonic()
        os.killpg(self.pgid, signal.SIGTERM)
        while group_members(self.pgid) and time.monotonic() - started < 30:
            time.sleep(0.1)
        return time.monotonic() - started

    def kill(self) -> None:
        for pid in group_members(self.pgid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def test_stopping_scripts_run_ends_every_process_within_10_s_and_hands_back_the_job(tmp_path):
    env = {k: v for k, v in clean_env(tmp_path).items() if not k.startswith("CELERY_")}
    port = free_port()
    # The receiver listens on 127.0.0.1, which a production destination check refuses.
    env.update(HOST="127.0.0.1", PORT=str(port), SCAIECHO_WEBHOOK_ALLOW_PRIVATE="true")
    base = f"http://127.0.0.1:{port}"
    subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=300)
    key = subprocess.run(
        [PYTHON, "manage.py", "create_api_key", "--tenant", "acme", "--user", "alice", "--role", "tenant_admin"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120,
    ).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    api = f"{base}/v1/modules/scaiecho"

    receiver = WebhookReceiver()

    first = RunScript(env, tmp_path / "run1.log")
    try:
        first.wait_healthy(base)
        secret = httpx.post(f"{api}/webhook-secret", headers=headers, timeout=30).json()["data"]["secret"]
        created = httpx.post(
            f"{api}/transcribe", headers=headers, timeout=60,
            files={"file": ("talk.wav", synth_speech(SPOKEN))},
            data={"force_async": "true", "backend_preference": "prefer_self_hosted", "webhook_url": receiver.url},
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["data"]["job_id"]
        deadline = time.monotonic() + 120
        while httpx.get(f"{api}/transcribe/jobs/{job_id}", headers=headers).json()["data"]["status"] != "running":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.3)

        took = first.terminate_group()

        assert took <= 10.0, (took, group_members(first.pgid), first.log_path.read_text()[-3000:])
        assert not group_members(first.pgid)
    finally:
        first.kill()

    second = RunScript(env, tmp_path / "run2.log")
    try:
        second.wait_healthy(base)
        deadline = time.monotonic() + 240
        while True:
            job = httpx.get(f"{api}/transcribe/jobs/{job_id}", headers=headers).json()["data"]
            if job["status"] in ("completed", "failed") or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert job["status"] == "completed", (job, second.log_path.read_text()[-3000:])
        assert word_error_rate(SPOKEN, job["transcript"]) <= 0.25, job["transcript"]
        with sqlite3.connect(tmp_path / "var" / "db.sqlite3") as db:
            (billed,) = db.execute("SELECT COUNT(*) FROM tenants_usagerecord WHERE reference = ?", (job_id,)).fetchone()
        assert billed == 1
        call = receiver.wait_for(1, timeout=60)[0]
        payload = Webhook(secret).verify(call.body, call.headers)
        assert (payload["type"], payload["data"]["job_id"]) == ("transcription.completed", job_id)
        assert second.terminate_group() <= 10.0
    finally:
        second.kill()
        receiver.stop()
