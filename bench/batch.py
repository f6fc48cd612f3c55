"""Batch transcription benchmark: our engines against bare Whisper, the API's overhead, long files.

    .venv/bin/python -m bench.batch [--seconds 60] [--runs 3] [--model base] [--engine NAME] [--beam N]
                                    [--skip-engines] [--skip-api] [--skip-long] [--long-seconds 1200]

All audio is real recorded human speech with exact reference text (:mod:`bench.corpus`: LibriVox
clips from ``pocketsphinx-testdata`` and the English Asterisk prompts), joined with short natural
gaps to about ``--seconds``. In one run it prints

1. engines, side by side, each measured in its own child process (:mod:`bench.engines`), one at a
   time, ``--runs`` rounds in shuffled order: the reference, bare ``whisper.transcribe``
   (openai-whisper, greedy at temperature 0, the same packaged weights, the same one thread); our
   openai-whisper engine; our CTranslate2 engine (int8 on the CPU) at each ``--batch-sizes``, all
   greedy. When batch jobs search a beam (``--beam``, default ``SCAIECHO_WHISPER_BEAM_SIZE``, above
   1), also bare ``whisper.transcribe`` at that beam and the server's engine at that beam, so that
   each is compared with the reference that decodes the same way. For each: model load, median
   time, RTF (time / audio), speed against the greedy reference, WER (the service's own,
   ``speakers.verification.word_error_rate``), CPU seconds, peak RSS (``ru_maxrss`` of its own
   process); and PASS/MISS for the target "default engine >= 2.5x faster than bare
   whisper.transcribe at no worse WER", greedy against greedy and beam against the same beam, and
   the server's engine as configured against greedy bare Whisper (for information);
2. the API: a real server (``manage.py runserver``, i.e. daphne) and a real Celery worker
   (concurrency 1, one thread, the server's default engine or ``--engine``) on a throwaway data dir
   (SQLite + filesystem broker, or ``DATABASE_URL`` / ``REDIS_URL`` / ``CELERY_BROKER_URL`` from the
   environment), timing ``POST /transcribe`` until its 200 (sync) and with ``force_async`` until a
   poll sees ``completed`` (async), against the engine's own time;
3. a long file (``--long-seconds``, default 1200) through the API, async, with one worker and then
   with two (each concurrency 1), the workers set to split it (``SCAIECHO_LONG_AUDIO_SPLIT_SECONDS``
   / ``SCAIECHO_LONG_AUDIO_PIECE_SECONDS``): wall time of each and their ratio (target: about half).

``--skip-engines``, ``--skip-api`` and ``--skip-long`` leave parts out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx

from bench import corpus
from bench.engines import EngineRun, EngineSpec, measure

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
API = "/v1/modules/scaiecho"

# The issue's targets.
SPEED_TARGET = 2.5  # default engine vs bare whisper.transcribe, at no worse WER
API_OVERHEAD_TARGET = 1.10  # API wall time within 10 % of the engine's own time
TWO_WORKER_TARGET = 0.6  # two workers' wall time / one worker's: "roughly half"


def word_error_rate(reference: str, hypothesis: str) -> float:
    """The service's own WER (consent verification's): Whisper's English normalizer, then words."""
    from speakers.verification import word_error_rate as service_wer

    return service_wer(reference, hypothesis, language="en")


@dataclass(frozen=True)
class ServerDefaults:
    engine: str
    batch_size: int
    compute_type: str | None
    beam_size: int
    long_split_s: float
    long_piece_s: float


def server_defaults() -> ServerDefaults:
    """The engine settings the server would use with this environment."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scaiecho_site.settings")
    from django.conf import settings

    return ServerDefaults(
        engine=getattr(settings, "SCAIECHO_WHISPER_ENGINE", "ctranslate2"),
        batch_size=int(getattr(settings, "SCAIECHO_WHISPER_BATCH_SIZE", 4)),
        compute_type=getattr(settings, "SCAIECHO_WHISPER_COMPUTE_TYPE", None) or None,
        beam_size=int(getattr(settings, "SCAIECHO_WHISPER_BEAM_SIZE", 1)),
        long_split_s=float(getattr(settings, "SCAIECHO_LONG_AUDIO_SPLIT_SECONDS", 600.0)),
        long_piece_s=float(getattr(settings, "SCAIECHO_LONG_AUDIO_PIECE_SECONDS", 300.0)),
    )


# --- Processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the main process (Celery's warm shutdown retires the worker), then the group."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # leftovers: a pool child, a stuck server
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout=10)
        self._log.close()


T = TypeVar("T")


def run_with_procs(prefix: str, *, keep: bool, body: Callable[[Path, list[Proc]], T], interrupted: T) -> T:
    """Run ``body(tmp, procs)`` in a fresh temp dir; ``body`` appends every server and worker it starts
    to ``procs``. However it ends, they are stopped (last started first) and the temp dir is removed
    unless ``keep``. Ctrl-C, or SIGTERM (e.g. from a timeout), returns ``interrupted``."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    procs: list[Proc] = []
    # SIGTERM unwinds like Ctrl-C so the subprocesses are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return body(tmp, procs)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return interrupted
    finally:
        for proc in reversed(procs):
            proc.stop()
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout.strip()


def start_worker(name: str, env: dict[str, str], log_dir: Path) -> Proc:
    """A real Celery worker, concurrency 1 (its pool process loads the model at start)."""
    return Proc(
        name,
        [str(VENV_BIN / "celery"), "-A", "scaiecho_site", "worker", "-n", f"{name}-{os.getpid()}@%h",
         "--concurrency=1", "--loglevel=INFO"],
        env,
        log_dir,
    )


def wait_worker_idle(proc: Proc, timeout_s: float = 180) -> None:
    """Until Celery says ready and the worker's processes have stopped computing (model loaded)."""
    deadline = time.monotonic() + timeout_s
    while " ready." not in proc.log_path.read_text(errors="replace"):
        proc.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready within {timeout_s:.0f} s")
        time.sleep(0.3)
    while time.monotonic() < deadline:
        c0 = tree_cpu_s([proc.process.pid])
        time.sleep(1.0)
        if tree_cpu_s([proc.process.pid]) - c0 < 0.05:
            return
    raise RuntimeError(f"{proc.name} still busy {timeout_s:.0f} s after start")


def wait_ready(base_url: str, procs: list[Proc], timeout_s: float = 180) -> None:
    """Until ``/readyz`` says a speech backend is available (a worker announced itself)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in procs:
            proc.check()
        try:
            ready = httpx.get(f"{base_url}/readyz", timeout=5)
            if ready.status_code == 200 and ready.json()["checks"].get("backends") == "ok":
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server/worker not ready within {timeout_s:.0f} s")
        time.sleep(0.3)


# --- Measurements ----------------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and their live children."""
    total = 0.0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


@dataclass
class Sample:
    seconds: float
    transcript: str
    cpu_s: float = 0.0  # CPU seconds spent on it by the server + worker process trees
    # Server-side split from the job row (SQLite only), seconds.
    split: dict[str, float] = field(default_factory=dict)
    job_id: str = ""
    segments: list[dict] = field(default_factory=list)


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace(" ", "T")).timestamp()


def job_split(db_path: Path | None, job_id: str, t_start: float, t_end: float) -> dict[str, float]:
    """Where an API request's time went, from the job row's timestamps (wall clock, same machine)."""
    if db_path is None:
        return {}
    with sqlite3.connect(db_path) as db:
        row = db.execute(
            "SELECT created_at, started_at, completed_at FROM transcription_transcriptionjob WHERE id = ?",
            (job_id.replace("-", ""),),
        ).fetchone() or db.execute(
            "SELECT created_at, started_at, completed_at FROM transcription_transcriptionjob WHERE id = ?", (job_id,)
        ).fetchone()
    if not row or None in row:
        return {}
    created, started, completed = (_ts(v) for v in row)
    return {
        "to_created": created - t_start,  # upload, auth, sniff, staging, insert
        "queue": started - created,  # broker hand-off and worker pickup
        "work": completed - started,  # read staged + decode + transcribe + store
        "to_client": t_end - completed,  # job_wait / client poll noticing, response
    }


class Bench:
    def __init__(self, base_url: str, key: str, wav: bytes, db_path: Path | None, pids: list[int]) -> None:
        self.pids = pids
        self.client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=3600)
        self.wav = wav
        self.db_path = db_path

    def _post(self, *, force_async: bool) -> httpx.Response:
        data = {"language_hint": "en"}
        if force_async:
            data["force_async"] = "true"
        return self.client.post(f"{API}/transcribe", files={"file": ("speech.wav", self.wav, "audio/wav")}, data=data)

    def api_sync(self) -> Sample:
        c0, t0w, t0 = tree_cpu_s(self.pids), time.time(), time.perf_counter()
        resp = self._post(force_async=False)
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu_s(self.pids) - c0
        if resp.status_code != 200:
            raise RuntimeError(f"sync transcribe: {resp.status_code} {resp.text[:500]}")
        body = resp.json()["data"]
        split = job_split(self.db_path, body["job_id"], t0w, t0w + elapsed)
        return Sample(elapsed, body["transcript"], cpu, split, body["job_id"], body.get("segments") or [])

    def api_async(self, poll_s: float = 0.1) -> Sample:
        c0, t0w, t0 = tree_cpu_s(self.pids), time.time(), time.perf_counter()
        resp = self._post(force_async=True)
        if resp.status_code != 202:
            raise RuntimeError(f"async transcribe: {resp.status_code} {resp.text[:500]}")
        job_id = resp.json()["data"]["job_id"]
        while True:
            time.sleep(poll_s)
            poll = self.client.get(f"{API}/transcribe/jobs/{job_id}")
            if poll.status_code != 200:
                raise RuntimeError(f"poll: {poll.status_code} {poll.text[:500]}")
            job = poll.json()["data"]
            if job["status"] == "completed":
                break
            if job["status"] == "failed":
                raise RuntimeError(f"async job failed: {job}")
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu_s(self.pids) - c0
        split = job_split(self.db_path, job_id, t0w, t0w + elapsed)
        return Sample(elapsed, job["transcript"], cpu, split, job_id, job.get("segments") or [])


# --- 1. Engines side by side -----------------------------------------------------------------------


REFERENCE = "whisper.transcribe (ref)"


def reference_label(beam: int) -> str:
    """The bare ``whisper.transcribe`` row that decodes as ``beam`` does (1: greedy, the reference)."""
    return REFERENCE if beam <= 1 else f"whisper.transcribe beam {beam} (ref)"


def engine_specs(
    *, model: str, device: str, threads: int, batch_sizes: list[int], compute_type: str,
    beam: int = 1, engine: str = "ctranslate2", batch_size: int = 4,
) -> list[EngineSpec]:
    """Everything greedy; with ``beam`` above 1 also the reference and the server's ``engine`` (at
    its ``batch_size``) at that beam."""
    specs = [
        EngineSpec(REFERENCE, "reference", model, device, threads),
        EngineSpec("openai-whisper engine", "openai-whisper", model, device, threads),
    ]
    specs += [
        EngineSpec(f"ctranslate2 {compute_type} batch {b}", "ctranslate2", model, device, threads, compute_type, b)
        for b in batch_sizes
    ]
    if beam > 1:
        specs.append(EngineSpec(reference_label(beam), "reference", model, device, threads, beam=beam))
        if engine == "ctranslate2":
            label = f"ctranslate2 {compute_type} batch {batch_size} beam {beam}"
            specs.append(EngineSpec(label, engine, model, device, threads, compute_type, batch_size, beam))
        else:
            specs.append(EngineSpec(f"openai-whisper engine beam {beam}", engine, model, device, threads, beam=beam))
    return specs  # fmt: skip


def default_label(specs: list[EngineSpec], engine: str, batch_size: int, beam: int = 1) -> str | None:
    """The row of the engine the server runs with these settings (``beam`` 1: its greedy row)."""
    for spec in specs:
        if (
            spec.kind == engine
            and (engine != "ctranslate2" or spec.batch_size == batch_size)
            and (spec.beam or 1) == max(beam, 1)
        ):
            return spec.label
    return None


@dataclass
class EngineRow:
    label: str
    load_s: float
    seconds: float
    cpu_s: float
    wer: float
    peak_rss_mb: float
    error: str | None = None


def summarize(runs: list[EngineRun], reference_text: str) -> dict[str, EngineRow]:
    rows = {}
    for run in runs:
        if not run.seconds:
            rows[run.spec.label] = EngineRow(run.spec.label, 0, 0, 0, 0, 0, run.error or "no run")
            continue
        rows[run.spec.label] = EngineRow(
            run.spec.label,
            statistics.median(run.load_s),
            statistics.median(run.seconds),
            statistics.median(run.cpu_s),
            statistics.mean(word_error_rate(reference_text, t) for t in run.texts),
            run.peak_rss_mb,
            run.error,
        )
    return rows


def print_engine_table(rows: dict[str, EngineRow], audio_s: float, default: str | None) -> None:
    ref = rows.get(REFERENCE)
    ok_ref = ref is not None and not ref.error
    print(f"\n{'engine (* = server default)':<36} {'load s':>6} {'median s':>9} {'RTF':>6} {'x real':>7}"
          f" {'speed/ref':>9} {'WER':>6} {'CPU s':>7} {'CPU/ref':>7} {'peak RSS':>9}")
    for label, row in rows.items():
        name = ("* " if label == default else "  ") + label
        if row.error:
            print(f"{name:<36} FAILED: {row.error}")
            continue
        speed = f"{ref.seconds / row.seconds:8.2f}x" if ok_ref else f"{'--':>9}"
        cpu = f"{ref.cpu_s / row.cpu_s:6.2f}x" if ok_ref and row.cpu_s > 0 else f"{'--':>7}"
        print(f"{name:<36} {row.load_s:6.2f} {row.seconds:9.2f} {row.seconds / audio_s:6.3f} {audio_s / row.seconds:6.1f}x"
              f" {speed} {row.wer * 100:5.1f}% {row.cpu_s:7.2f} {cpu} {row.peak_rss_mb:6.0f} MB")


def engine_verdict(rows: dict[str, EngineRow], default: str | None, *, reference: str = REFERENCE,
                   decoding: str = "greedy") -> bool:
    """The target for ``default`` against bare Whisper's ``reference`` row (which decodes the same way)."""
    ref, row = rows.get(reference), rows.get(default or "")
    what = f"default engine >= {SPEED_TARGET}x faster than bare whisper.transcribe at no worse WER, both {decoding}"
    if not ref or ref.error or not row or row.error:
        print(f"MISS target: {what} (not measured: {(row and row.error) or (ref and ref.error) or 'no default engine row'})")
        return False
    speed = ref.seconds / row.seconds
    ok = speed >= SPEED_TARGET and row.wer <= ref.wer
    print(f"{'PASS' if ok else 'MISS'} target ({decoding} vs {decoding}): default engine ({default}) {speed:.2f}x"
          f" faster than bare {reference} [>= {SPEED_TARGET}x: {'ok' if speed >= SPEED_TARGET else 'no'}]"
          f" at WER {row.wer * 100:.1f} % vs {ref.wer * 100:.1f} % [no worse: {'ok' if row.wer <= ref.wer else 'no'}]"
          f"; by CPU time {ref.cpu_s / row.cpu_s:.2f}x")
    return ok


def engine_verdicts(rows: dict[str, EngineRow], labels: dict[int, str | None], beam: int) -> None:
    """Greedy against greedy (issue 9's measure); with a beam, beam against the same beam, and the
    server as configured against greedy bare Whisper (what a switch from bare greedy Whisper gives)."""
    engine_verdict(rows, labels[1])
    if beam <= 1:
        return
    engine_verdict(rows, labels[beam], reference=reference_label(beam), decoding=f"beam {beam}")
    ref, row = rows.get(REFERENCE), rows.get(labels[beam] or "")
    if ref and row and not ref.error and not row.error:
        print(f"info: the server as configured ({labels[beam]}) against bare greedy whisper.transcribe:"
              f" {ref.seconds / row.seconds:.2f}x faster, WER {row.wer * 100:.1f} % vs {ref.wer * 100:.1f} %")


# --- 2. The API's overhead -------------------------------------------------------------------------


def api_runs(args: argparse.Namespace, bench: Bench, short: Bench, rec: corpus.Recording, engine_row: EngineRow | None,
             ref_row: EngineRow | None) -> None:
    short.api_sync()  # warm-up: first-call costs (lazy imports, allocator, mel filters) are not overhead
    modes = {"api-sync": bench.api_sync, "api-async": bench.api_async}
    results: dict[str, list[Sample]] = {name: [] for name in modes}
    rng = random.Random(args.seed)
    print(f"\n== API: {rec.seconds:.1f} s through a real server and worker, {args.runs} runs ==")
    for run in range(args.runs):
        order = list(modes) if run == 0 else rng.sample(list(modes), len(modes))
        for name in order:
            sample = modes[name]()
            results[name].append(sample)
            extra = "  ".join(f"{k} {v:.2f}" for k, v in sample.split.items())
            print(f"  run {run + 1} {name:<9} {sample.seconds:7.2f} s  cpu {sample.cpu_s:6.2f} s  {extra}", flush=True)
    refs = {"engine": engine_row, "whisper": ref_row}
    print(f"\n{'mode':<10} {'median s':>9} {'RTF':>6} {'/engine':>8} {'/whisper':>9} {'WER':>6} {'CPU s':>7}")
    med = {}
    for name, samples in results.items():
        med[name] = statistics.median(s.seconds for s in samples)
        wer = statistics.mean(word_error_rate(rec.text, s.transcript) for s in samples)
        ratios = " ".join(
            f"{med[name] / r.seconds:{w}.3f}" if r and not r.error else f"{'--':>{w}}"
            for r, w in ((refs["engine"], 8), (refs["whisper"], 9))
        )
        print(f"{name:<10} {med[name]:9.2f} {med[name] / rec.seconds:6.3f} {ratios} {wer * 100:5.1f}%"
              f" {statistics.median(s.cpu_s for s in samples):7.2f}")
    for name, samples in results.items():
        if not all(s.split for s in samples):
            continue
        split = {k: statistics.median(s.split[k] for s in samples) for k in samples[0].split}
        print(f"{name} split (median s): " + "  ".join(f"{k} {v:.2f}" for k, v in split.items()))
        # Contention-robust view: wall time outside the worker's own work.
        outside = statistics.median(s.seconds - s.split["work"] for s in samples)
        print(f"  {name}: {outside:.2f} s outside the worker's work"
              + (f" = {outside / engine_row.seconds * 100:.1f} % of the engine's time" if engine_row and not engine_row.error else ""))
    if engine_row and not engine_row.error:
        for name in modes:
            ratio = med[name] / engine_row.seconds
            print(f"{'PASS' if ratio <= API_OVERHEAD_TARGET else 'MISS'} target: {name} within"
                  f" {(API_OVERHEAD_TARGET - 1) * 100:.0f} % of the engine's own time: {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")


# --- 3. A long file, one worker against two --------------------------------------------------------


def job_pieces(env: dict[str, str], job_id: str) -> list[dict]:
    """The job's pieces (worker, seconds) from the database, whichever database it is."""
    code = (
        "import json; from transcription.models import TranscriptionPiece as P; "
        f"print(json.dumps([[p.index, p.worker_id, (p.end_sample - p.start_sample) / 16000, "
        f"(p.completed_at - p.started_at).total_seconds() if p.completed_at and p.started_at else None] "
        f"for p in P.objects.filter(job_id='{job_id}').order_by('index')]))"
    )
    try:
        return [dict(zip(("index", "worker", "audio_s", "work_s"), p, strict=True))
                for p in json.loads(manage(env, "shell", "-c", code).splitlines()[-1])]
    except (RuntimeError, ValueError, IndexError) as exc:
        print(f"  (pieces not readable: {str(exc).strip().splitlines()[-1][:200]})")
        return []


def long_runs(args: argparse.Namespace, env: dict[str, str], base_url: str, key: str, server: Proc,
              procs: list[Proc], tmp: Path) -> None:
    """The workers are the ``worker*`` entries of ``procs``; a second one is started (and added to
    ``procs``, which the caller stops) after the one-worker run."""
    rec = corpus.recording(args.long_seconds, seed=args.seed + 1)
    split, piece = float(env["SCAIECHO_LONG_AUDIO_SPLIT_SECONDS"]), float(env["SCAIECHO_LONG_AUDIO_PIECE_SECONDS"])
    print(f"\n== long file: {rec.describe()}; split above {split:g} s into pieces of about {piece:g} s ==")
    if rec.seconds <= split:
        print(f"  WARNING: {rec.seconds:.0f} s is not above the split threshold: it will not be split")
    wav = rec.wav()
    times: dict[int, float] = {}
    for n in (1, 2):
        workers = [p for p in procs if p.name.startswith("worker")]
        while len(workers) < n:
            workers.append(start_worker(f"worker{len(workers) + 1}", env, tmp))
            procs.append(workers[-1])
        for w in workers:
            wait_worker_idle(w)
        bench = Bench(base_url, key, wav, None, [server.process.pid] + [w.process.pid for w in workers])
        sample = bench.api_async(poll_s=0.5)
        times[n] = sample.seconds
        ends = [float(s["end"]) for s in sample.segments]
        starts = [float(s["start"]) for s in sample.segments]
        monotonic = all(b >= a - 0.01 for a, b in zip(starts, starts[1:], strict=False))
        pieces = job_pieces(env, sample.job_id)
        by_worker: dict[str, int] = {}
        for p in pieces:
            by_worker[p["worker"] or "?"] = by_worker.get(p["worker"] or "?", 0) + 1
        print(f"  {n} worker(s): {sample.seconds:7.1f} s wall  RTF {sample.seconds / rec.seconds:.3f}"
              f"  WER {word_error_rate(rec.text, sample.transcript) * 100:.1f} %  CPU {sample.cpu_s:.0f} s"
              f"  segments {len(ends)}, last ends at {max(ends, default=0):.1f} of {rec.seconds:.1f} s,"
              f" starts in order: {'yes' if monotonic else 'NO'}")
        print(f"    pieces {len(pieces)}"
              + (": " + ", ".join(f"{w.split('@')[0]} x{c}" for w, c in sorted(by_worker.items())) if pieces else "")
              + (" (" + " ".join(f"{p['audio_s']:.0f}s/{p['work_s']:.0f}s" for p in pieces if p["work_s"] is not None)
                 + " audio/work)" if pieces else ""), flush=True)
    ratio = times[2] / times[1]
    print(f"{'PASS' if ratio <= TWO_WORKER_TARGET else 'MISS'} target: two workers take about half of one worker's"
          f" time: {times[2]:.1f} s / {times[1]:.1f} s = {ratio:.2f} [<= {TWO_WORKER_TARGET}]")


# --- Main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the test speech (default 60)")
    parser.add_argument("--runs", type=int, default=3, help="rounds per engine and runs per API mode (default 3); medians")
    parser.add_argument("--model", default="base", help="Whisper model for every engine (default base)")
    parser.add_argument("--engine", default=None,
                        help="SCAIECHO_WHISPER_ENGINE for the server and worker (default: the settings' default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (SCAIECHO_WHISPER_DEVICE; default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per engine and worker (default 1)")
    parser.add_argument("--beam", type=int, default=None,
                        help="beam width of batch jobs (SCAIECHO_WHISPER_BEAM_SIZE; default: the settings'); above 1,"
                             " the server's engine and bare whisper.transcribe are also measured at it")
    parser.add_argument("--batch-sizes", default=None,
                        help="CTranslate2 batch sizes to measure (default 1 and the settings' batch size)")
    parser.add_argument("--compute-type", default=None,
                        help="CTranslate2 compute type (default: the settings', else int8 on cpu, float16 on cuda)")
    parser.add_argument("--long-seconds", type=float, default=1200.0, help="length of the long file (default 1200)")
    parser.add_argument("--long-split-seconds", type=float, default=None,
                        help="SCAIECHO_LONG_AUDIO_SPLIT_SECONDS for the workers (default: the settings')")
    parser.add_argument("--long-piece-seconds", type=float, default=None,
                        help="SCAIECHO_LONG_AUDIO_PIECE_SECONDS for the workers (default: the settings')")
    parser.add_argument("--skip-engines", action="store_true", help="leave out the engines side by side")
    parser.add_argument("--skip-api", action="store_true", help="leave out the API's sync/async overhead")
    parser.add_argument("--skip-long", action="store_true", help="leave out the long file with one and two workers")
    parser.add_argument("--seed", type=int, default=0, help="seed for the speech and the order of the runs")
    parser.add_argument("--verbose", action="store_true", help="print the reference text and each engine's transcript")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database) for inspection")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_with_procs("scaiecho-bench-", keep=args.keep, body=partial(_run, args), interrupted=130)


def run_engines(args: argparse.Namespace, rec: corpus.Recording) -> tuple[dict[str, EngineRow], str | None]:
    """Part 1, also used by ``bench.gpu``: the engine rows and the server default's label (at the
    configured beam)."""
    rows, labels, _beam = _run_engines(args, rec)
    return rows, labels[max(labels)]


def _run_engines(args: argparse.Namespace, rec: corpus.Recording) -> tuple[dict[str, EngineRow], dict[int, str | None], int]:
    """The engine rows, the server engine's label per beam width measured (1, and the configured
    one), and the configured beam width."""
    defaults = server_defaults()
    engine = args.engine or defaults.engine
    beam = max(args.beam or defaults.beam_size, 1)
    compute = args.compute_type or defaults.compute_type or ("int8" if args.device == "cpu" else "float16")
    sizes = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else sorted({1, defaults.batch_size})
    specs = engine_specs(model=args.model, device=args.device, threads=args.threads, batch_sizes=sizes,
                         compute_type=compute, beam=beam, engine=engine, batch_size=defaults.batch_size)
    labels = {b: default_label(specs, engine, defaults.batch_size, b) for b in sorted({1, beam})}
    default = labels[beam]
    print(f"\n== engines: {rec.seconds:.1f} s, model {args.model} on {args.device}, {args.threads} thread(s),"
          f" {args.runs} round(s), each engine in its own process ==")
    runs = measure(specs, rec.samples, rounds=args.runs, seed=args.seed)
    rows = summarize(runs, rec.text)
    print_engine_table(rows, rec.seconds, default)
    if args.verbose:
        print(f"\nreference text: {rec.text}")
        for run in runs:
            if run.texts:
                print(f"{run.spec.label}: {run.texts[0]}")
    return rows, labels, beam


def _run(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> int:
    t_start = time.perf_counter()
    rec = corpus.recording(args.seconds, seed=args.seed)
    print(f"speech: {rec.describe()}")
    if not corpus.has_asterisk():
        print(f"  note: only the LibriVox clips are installed, so the speech repeats; for more: {corpus.INSTALL_HINT}")

    rows: dict[str, EngineRow] = {}
    default = None
    beam = max(args.beam or server_defaults().beam_size, 1)
    if not args.skip_engines:
        rows, labels, beam = _run_engines(args, rec)
        default = labels[beam]
        engine_verdicts(rows, labels, beam)

    if args.skip_api and args.skip_long:
        print(f"total {time.perf_counter() - t_start:.0f} s")
        return 0

    defaults = server_defaults()
    env = {
        **os.environ,
        "SCAIECHO_DATA_DIR": str(tmp / "data"),
        "SCAIECHO_WHISPER_MODEL": args.model,
        "SCAIECHO_WHISPER_CPU_THREADS": str(args.threads),
        "SCAIECHO_WHISPER_DEVICE": args.device,
        "SCAIECHO_LONG_AUDIO_SPLIT_SECONDS": str(args.long_split_seconds or defaults.long_split_s),
        "SCAIECHO_LONG_AUDIO_PIECE_SECONDS": str(args.long_piece_seconds or defaults.long_piece_s),
        # Polling at 10 Hz for minutes is far over the default 60 requests/min per key.
        "SCAIECHO_RATELIMIT_PER_KEY": "100000",
        "SCAIECHO_RATELIMIT_PER_USER": "100000",
        "SCAIECHO_RATELIMIT_PER_TENANT": "100000",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(args.threads),
    }
    if args.engine:
        env["SCAIECHO_WHISPER_ENGINE"] = args.engine
    if args.compute_type:
        env["SCAIECHO_WHISPER_COMPUTE_TYPE"] = args.compute_type
    if args.beam:
        env["SCAIECHO_WHISPER_BEAM_SIZE"] = str(args.beam)
    db_path = None if os.environ.get("DATABASE_URL") else tmp / "data" / "db.sqlite3"
    manage(env, "migrate", "--noinput", "-v", "0")
    key = manage(env, "create_api_key", "--tenant", "bench", "--user", "bench", "--role", "tenant_admin")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = Proc("server", [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"], env, tmp)
    procs.append(server)
    workers = [start_worker("worker1", env, tmp)]
    procs.append(workers[0])
    wait_ready(base_url, procs)
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    resp = client.patch(f"{API}/tenant-policy", json={"allowed_backends": "A", "default_backend": "A"})
    if resp.status_code != 200:
        raise RuntimeError(f"tenant policy: {resp.status_code} {resp.text[:500]}")
    engine = args.engine or defaults.engine
    print(f"\nserver engine {engine} on {args.device} ({'SQLite + filesystem broker' if db_path else 'DATABASE_URL'});"
          f" setup so far {time.perf_counter() - t_start:.1f} s")

    if not args.skip_api:
        pids = [server.process.pid, workers[0].process.pid]
        bench = Bench(base_url, key, rec.wav(), db_path, pids)
        short = Bench(base_url, key, corpus.recording(4, seed=args.seed + 7).wav(), db_path, pids)
        api_runs(args, bench, short, rec, rows.get(default or ""), rows.get(reference_label(beam)))

    if not args.skip_long:
        long_runs(args, env, base_url, key, server, procs, tmp)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
