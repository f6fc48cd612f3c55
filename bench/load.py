"""Load: several tenants at once, each uploading, streaming and polling, against one real server.

    .venv/bin/python -m bench.load [--seconds 60] [--tenants 3] [--uploaders 1] [--streams 1]
                                   [--model tiny.en] [--url URL --key KEY ...]

Self-contained like ``bench.batch`` and ``bench.stream`` (whose helpers it reuses): on a throwaway
``SCAIECHO_DATA_DIR`` it migrates, starts ``manage.py runserver`` (daphne), one Celery worker and,
when ``REDIS_URL`` is set, one ``manage.py stream_worker`` (without it the web process runs the
stream worker itself). ``DATABASE_URL`` / ``REDIS_URL`` / ``CELERY_BROKER_URL`` from the environment
are used when set (as ``bench.batch`` does); without them the embedded defaults (SQLite, the
filesystem broker) are used. It creates ``--tenants`` tenants, each with a tenant-admin key
(``manage.py create_api_key``) and a Backend A policy. ``--url`` targets a running server instead;
give one ``--key`` per tenant (their policies are left as they are).

Then, for ``--seconds``, every tenant at once runs:

- ``--uploaders`` upload loops: ``POST /transcribe`` of a few seconds of real speech
  (:mod:`bench.corpus`), alternately inline and ``force_async``; an inline request over the
  inline-wait cap answers 202 and is followed like an async one;
- ``--streams`` stream loops: conversations of real speech as 100 ms ``audio/pcm`` frames at
  real-time pace (``bench.stream.run_session``), one after the other;
- one poll loop: ``GET /transcribe/jobs/{id}`` of its unfinished async jobs every
  ``--poll-interval`` seconds, until each is ``completed`` or ``failed``.

After ``--seconds`` no new work starts; what is in flight finishes, then every accepted job is read
once more (up to ``--drain`` seconds for all to end). It prints per tenant the latency (p50/p95) of
each kind of request, the errors by code, and whether any job was lost: every accepted job must
end ``completed``, or ``failed`` with a reason; one still ``queued``/``running`` after the drain is
lost. Exit status 1 when a job was lost or an error other than the documented ``RATE_LIMITED`` /
``BUDGET_EXCEEDED`` (HTTP 429, stream close 4429) was seen, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

from bench import corpus
from bench.batch import API, Proc, free_port, manage, run_with_procs, start_worker, wait_ready
from bench.stream import Conversation, SessionResult, make_conversations, run_session

# The errors a loaded server may answer by design (contract: 429 and close 4429).
DOCUMENTED = {"RATE_LIMITED", "BUDGET_EXCEEDED"}
KINDS = ("inline", "async", "poll", "stream_ready", "stream_final")


@dataclass
class Tenant:
    name: str
    key: str
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    missing_finals: int = 0  # utterances of a stream that got no final covering them (quality, not an error)
    accepted: set[str] = field(default_factory=set)  # every job id the server accepted
    open_jobs: dict[str, float] = field(default_factory=dict)  # async job id -> perf_counter at 202
    final: dict[str, dict] = field(default_factory=dict)  # job id -> its last poll
    lock: threading.Lock = field(default_factory=threading.Lock)

    def took(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)

    def error(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1


def error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP_{response.status_code}"


# --- The three kinds of work ---------------------------------------------------------------------


def upload_loop(base_url: str, tenant: Tenant, clips: list[bytes], stop: threading.Event) -> None:
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=600)
    turn = 0
    while not stop.is_set():
        wav = clips[turn % len(clips)]
        inline = turn % 2 == 0
        turn += 1
        data = {"language_hint": "en"} if inline else {"language_hint": "en", "force_async": "true"}
        started = time.perf_counter()
        try:
            response = client.post(f"{API}/transcribe", files={"file": ("speech.wav", wav, "audio/wav")}, data=data)
        except httpx.HTTPError as exc:
            tenant.error(f"transport:{type(exc).__name__}")
            continue
        elapsed = time.perf_counter() - started
        if response.status_code == 200:
            tenant.took("inline", elapsed)
            with tenant.lock:
                tenant.accepted.add(response.json()["data"]["job_id"])
        elif response.status_code == 202:
            job_id = response.json()["data"]["job_id"]
            with tenant.lock:
                tenant.accepted.add(job_id)
                tenant.open_jobs[job_id] = started
        else:
            tenant.error(error_code(response))
            if response.status_code == 429:
                stop.wait(float(response.headers.get("Retry-After", "1")))


def poll_loop(base_url: str, tenant: Tenant, interval: float, done: threading.Event) -> None:
    """Follow the tenant's async jobs until each ends; runs until ``done`` and nothing is open."""
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=60)
    while not (done.is_set() and not tenant.open_jobs):
        with tenant.lock:
            jobs = list(tenant.open_jobs.items())
        for job_id, accepted_at in jobs:
            started = time.perf_counter()
            try:
                response = client.get(f"{API}/transcribe/jobs/{job_id}")
            except httpx.HTTPError as exc:
                tenant.error(f"transport:{type(exc).__name__}")
                continue
            tenant.took("poll", time.perf_counter() - started)
            if response.status_code != 200:
                tenant.error(error_code(response))
                continue
            job = response.json()["data"]
            if job["status"] in ("completed", "failed"):
                with tenant.lock:
                    tenant.open_jobs.pop(job_id, None)
                    tenant.final[job_id] = job
                if job["status"] == "completed":
                    tenant.took("async", time.perf_counter() - accepted_at)
        time.sleep(interval)


async def stream_loop(ws_url: str, tenant: Tenant, convs: list[Conversation], stop: threading.Event) -> None:
    turn = 0
    while not stop.is_set():
        conv = convs[turn % len(convs)]
        turn += 1
        result = SessionResult(conv)
        try:
            await run_session(ws_url, conv, time.perf_counter(), result)
        except Exception as exc:  # the server closed the stream: its error frame says why
            result.error = result.error or f"transport:{type(exc).__name__}: {exc}"
        if result.error:
            code = result.error.split(":", 1)[0]
            tenant.error(f"stream:{code}")
            if code in DOCUMENTED:
                await asyncio.sleep(1)
            continue
        result.analyse()
        tenant.took("stream_ready", result.ready_s)
        for latency in result.final_lat:
            if latency is None:
                with tenant.lock:
                    tenant.missing_finals += 1
            else:
                tenant.took("stream_final", latency)


def stream_thread(ws_url: str, tenant: Tenant, convs: list[Conversation], stop: threading.Event) -> None:
    asyncio.run(stream_loop(ws_url, tenant, convs, stop))


# --- Lost jobs -------------------------------------------------------------------------------------


def check_jobs(base_url: str, tenant: Tenant, deadline: float) -> list[str]:
    """Every accepted job, read once its polls are over: the ids that never ended properly."""
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=60)
    lost = []
    for job_id in sorted(tenant.accepted):
        while True:
            response = client.get(f"{API}/transcribe/jobs/{job_id}")
            job = response.json().get("data") if response.status_code == 200 else None
            if job and job["status"] in ("completed", "failed"):
                tenant.final[job_id] = job
                if job["status"] == "failed" and not job.get("status_reason"):
                    lost.append(f"{job_id} failed without a reason")
                break
            if time.monotonic() > deadline:
                lost.append(f"{job_id} still {job['status'] if job else response.status_code}")
                break
            time.sleep(0.5)
    return lost


# --- Report ----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(tenants: list[Tenant], lost: dict[str, list[str]], seconds: float) -> int:
    print(f"\n{'tenant':<10} {'kind':<13} {'n':>5} {'p50 s':>7} {'p95 s':>7}")
    for tenant in tenants:
        for kind in KINDS:
            values = tenant.latencies.get(kind, [])
            if values:
                print(f"{tenant.name:<10} {kind:<13} {len(values):>5} {pct(values, 0.5):>7.2f} {pct(values, 0.95):>7.2f}")
    print()
    undocumented = 0
    for tenant in tenants:
        failed = [job for job in tenant.final.values() if job["status"] == "failed"]
        reasons = Counter(job.get("status_reason") for job in failed)
        errors = ", ".join(f"{code} {n}" for code, n in sorted(tenant.errors.items())) or "none"
        why = f" ({', '.join(f'{reason}: {n}' for reason, n in reasons.items())})" if failed else ""
        print(f"{tenant.name}: jobs accepted {len(tenant.accepted)}, completed {len(tenant.final) - len(failed)},"
              f" failed {len(failed)}{why}; stream utterances without a final {tenant.missing_finals}; errors: {errors}")
        undocumented += sum(n for code, n in tenant.errors.items() if code.split(":")[-1] not in DOCUMENTED)
    total_lost = sum(len(ids) for ids in lost.values())
    for name, ids in lost.items():
        for line in ids:
            print(f"  LOST ({name}): {line}")
    jobs = sum(len(t.accepted) for t in tenants)
    streams = sum(len(t.latencies.get("stream_ready", [])) for t in tenants)
    print(f"\n{len(tenants)} tenants for {seconds:.0f} s: {jobs} jobs, {streams} streams;"
          f" undocumented errors: {undocumented}; lost jobs: {total_lost}")
    ok = undocumented == 0 and total_lost == 0
    print(f"{'PASS' if ok else 'FAIL'}: no undocumented error and no lost job")
    return 0 if ok else 1


# --- Setup -----------------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> tuple[str, list[str]]:
    env = {
        **os.environ,
        "SCAIECHO_DATA_DIR": str(tmp / "data"),
        "SCAIECHO_WHISPER_MODEL": args.model,
        "SCAIECHO_WHISPER_CPU_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        # The loops poll and upload far over the default 60 requests/min per key; the limits
        # themselves are tested elsewhere, this measures the service under load.
        "SCAIECHO_RATELIMIT_PER_KEY": "100000",
        "SCAIECHO_RATELIMIT_PER_USER": "100000",
        "SCAIECHO_RATELIMIT_PER_TENANT": "100000",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    manage(env, "migrate", "--noinput", "-v", "0")
    keys = [
        manage(env, "create_api_key", "--tenant", f"load-{i}", "--user", f"load-{i}", "--role", "tenant_admin")
        for i in range(args.tenants)
    ]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    procs.append(Proc("server", [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"], env, tmp))
    procs.append(start_worker("worker", env, tmp))
    if env.get("REDIS_URL"):
        stream_worker = Proc("stream_worker", [sys.executable, "manage.py", "stream_worker"], env, tmp)
        procs.append(stream_worker)
        deadline = time.monotonic() + 180
        while b" ready" not in stream_worker.log_path.read_bytes():  # as bench.stream waits for it
            stream_worker.check()
            if time.monotonic() > deadline:
                raise RuntimeError("stream worker not ready within 180 s")
            time.sleep(0.3)
    wait_ready(base_url, procs)
    for key in keys:
        response = httpx.patch(f"{base_url}{API}/tenant-policy", headers={"Authorization": f"Bearer {key}"},
                               json={"allowed_backends": "A", "default_backend": "A"}, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"tenant policy: {response.status_code} {response.text[:500]}")
    return base_url, keys


def warm_up(ws_url: str, conv: Conversation) -> None:
    """One stream before the clock starts: the first stream may load the model."""
    result = SessionResult(conv)
    asyncio.run(run_session(ws_url, conv, time.perf_counter(), result))
    if result.error:
        raise RuntimeError(f"warm-up stream failed: {result.error}")


def run(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> int:
    if args.url:
        base_url, keys = args.url.rstrip("/"), args.key
        if not keys:
            raise SystemExit("--url needs one --key per tenant")
    else:
        base_url, keys = start_server(args, tmp, procs)
    tenants = [Tenant(f"tenant{i}", key) for i, key in enumerate(keys)]
    clips = [corpus.recording(args.clip_seconds, seed=seed).wav() for seed in range(4)]
    convs = make_conversations(len(tenants) * args.streams + 1, args.utterances)
    ws_base = base_url.replace("http", "ws", 1)
    warm_up(f"{ws_base}{API}/stream/transcribe?token={keys[0]}", convs[-1])
    print(f"{len(tenants)} tenants x ({args.uploaders} upload loop(s) of {args.clip_seconds:g} s real speech,"
          f" {args.streams} stream loop(s) of {convs[0].duration:.1f} s conversations, 1 poll loop)"
          f" for {args.seconds:g} s against {base_url}")

    stop, stopped = threading.Event(), threading.Event()
    threads = []
    for index, tenant in enumerate(tenants):
        ws_url = f"{ws_base}{API}/stream/transcribe?token={tenant.key}"
        mine = convs[index * args.streams : (index + 1) * args.streams]
        threads += [threading.Thread(target=upload_loop, args=(base_url, tenant, clips, stop)) for _ in range(args.uploaders)]
        threads += [threading.Thread(target=stream_thread, args=(ws_url, tenant, [conv], stop)) for conv in mine]
    pollers = [threading.Thread(target=poll_loop, args=(base_url, t, args.poll_interval, stopped)) for t in tenants]
    started = time.perf_counter()
    for thread in threads + pollers:
        thread.start()
    time.sleep(args.seconds)
    stop.set()
    for thread in threads:
        thread.join()
    stopped.set()
    deadline = time.monotonic() + args.drain
    for thread in pollers:
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.check()
    lost = {tenant.name: check_jobs(base_url, tenant, deadline) for tenant in tenants}
    return report(tenants, {name: ids for name, ids in lost.items() if ids}, elapsed)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long the tenants run at once (default 60)")
    parser.add_argument("--tenants", type=int, default=3, help="tenants, each with its own key (default 3)")
    parser.add_argument("--uploaders", type=int, default=1, help="concurrent upload loops per tenant (default 1)")
    parser.add_argument("--streams", type=int, default=1, help="concurrent stream loops per tenant (default 1)")
    parser.add_argument("--utterances", type=int, default=3, help="utterances per streamed conversation (default 3)")
    parser.add_argument("--clip-seconds", type=float, default=6, help="seconds of speech per upload (default 6)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between a tenant's polls (default 0.5)")
    parser.add_argument("--drain", type=float, default=180,
                        help="seconds after --seconds for in-flight work to end before a job counts as lost (default 180)")
    parser.add_argument("--model", default="tiny.en", help="Whisper model of the started server (default tiny.en)")
    parser.add_argument("--url", default=None, help="target this running server instead of starting one")
    parser.add_argument("--key", action="append", default=[], help="with --url: an API key, one per tenant (repeat)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database) for inspection")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_with_procs("scaiecho-bench-load-", keep=args.keep, body=partial(run, args), interrupted=130)


if __name__ == "__main__":
    sys.exit(main())
