"""Batch transcription benchmark: the API (sync and async) against Whisper called directly.

    .venv/bin/python -m bench.batch [--seconds 60] [--runs 3] [--model base]

Self-contained: it synthesizes ~``--seconds`` of English speech with espeak-ng, starts a real
server (``manage.py runserver``, i.e. daphne) and a real Celery worker (concurrency 1, one torch
thread) against a throwaway data dir (SQLite + filesystem broker; ``DATABASE_URL``/``REDIS_URL``
from the environment are used instead when set), and for each run times

- ``whisper``: plain ``whisper.transcribe(model, samples, language="en", fp16=False)`` in this
  process (the reference the issue names),
- ``engine``: ``WhisperEngine.transcribe`` (what the worker runs) on the same loaded model,
- ``api-sync``: ``POST /transcribe`` until its 200,
- ``api-async``: ``POST /transcribe`` with ``force_async`` until a poll (every 0.1 s) of
  ``GET /transcribe/jobs/{id}`` sees ``completed``.

Direct runs happen while the worker is idle and API runs while this process is idle, so they do not
compete for the CPU. The order of the modes is shuffled per run; medians are reported.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
API = "/v1/modules/scaiecho"

SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.",
    "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.",
    "What joy there is in living.",
]


# --- Speech ----------------------------------------------------------------------------------------


def make_speech(seconds: float, cache_dir: Path) -> tuple[bytes, str]:
    """WAV bytes of espeak-ng reading sentences until ``seconds`` are reached, and the text read."""
    from tests.voices import synth_speech

    frames: list[bytes] = []
    spoken: list[str] = []
    params = None
    total = 0.0
    i = 0
    while total < seconds:
        sentence = SENTENCES[i % len(SENTENCES)]
        i += 1
        with wave.open(io.BytesIO(synth_speech(sentence, cache_dir=cache_dir))) as w:
            params = params or w.getparams()
            frames.append(w.readframes(w.getnframes()))
            pause = b"\0" * (int(0.25 * w.getframerate()) * w.getsampwidth())
            frames.append(pause)
            total += (w.getnframes() / w.getframerate()) + 0.25
        spoken.append(sentence)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setparams(params)
        w.writeframes(b"".join(frames))
    return out.getvalue(), " ".join(spoken)


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


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout.strip()


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
    cpu_s: float = 0.0  # CPU seconds spent on it: this process (direct) or server + worker (API)
    # API runs only: server-side split from the job row (SQLite only), seconds.
    split: dict[str, float] = field(default_factory=dict)


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
        self.client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
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
        return Sample(elapsed, body["transcript"], cpu, job_split(self.db_path, body["job_id"], t0w, t0w + elapsed))

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
        return Sample(elapsed, job["transcript"], cpu, job_split(self.db_path, job_id, t0w, t0w + elapsed))


class Direct:
    def __init__(self, model: str, wav: bytes) -> None:
        import torch
        import whisper

        from speech.audio import decode_audio
        from speech.engines.base import TranscribeOptions
        from speech.engines.whisper import WhisperEngine

        self.whisper = whisper
        self.torch = torch
        t0 = time.perf_counter()
        self.samples = decode_audio(wav).samples
        self.decode_s = time.perf_counter() - t0
        self.engine = WhisperEngine(model_name=model, cpu_threads=1)
        self.model = self.engine.load().model
        self.options = TranscribeOptions(language="en")

    def engine_run(self) -> Sample:
        c0, t0 = time.process_time(), time.perf_counter()
        result = self.engine.transcribe(self.samples, options=self.options)
        return Sample(time.perf_counter() - t0, result.text, time.process_time() - c0)

    def whisper_run(self) -> Sample:
        self.torch.set_num_threads(1)
        c0, t0 = time.process_time(), time.perf_counter()
        with self.torch.inference_mode():
            raw = self.whisper.transcribe(self.model, self.samples, language="en", fp16=False, verbose=None)
        return Sample(time.perf_counter() - t0, str(raw["text"]).strip(), time.process_time() - c0)


# --- Main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the test speech (default 60)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per mode (default 3); medians reported")
    parser.add_argument("--model", default="base", help="Whisper model for both sides (default base)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the per-run order of the modes")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database) for inspection")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="scaiecho-bench-"))
    procs: list[Proc] = []
    # SIGTERM (e.g. from a timeout) unwinds like Ctrl-C so the subprocesses are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return _run(args, tmp, procs)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for proc in reversed(procs):
            proc.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> int:
    from tests.voices import word_error_rate

    t_start = time.perf_counter()
    wav, reference = make_speech(args.seconds, tmp / "speech")
    with wave.open(io.BytesIO(wav)) as w:
        audio_s = w.getnframes() / w.getframerate()

    env = {
        **os.environ,
        "SCAIECHO_DATA_DIR": str(tmp / "data"),
        "SCAIECHO_WHISPER_MODEL": args.model,
        "SCAIECHO_WHISPER_CPU_THREADS": "1",
        # Polling at 10 Hz for a minute is far over the default 60 requests/min per key.
        "SCAIECHO_RATELIMIT_PER_KEY": "100000",
        "SCAIECHO_RATELIMIT_PER_USER": "100000",
        "SCAIECHO_RATELIMIT_PER_TENANT": "100000",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    db_path = None if os.environ.get("DATABASE_URL") else tmp / "data" / "db.sqlite3"

    manage(env, "migrate", "--noinput", "-v", "0")
    key = manage(env, "create_api_key", "--tenant", "bench", "--user", "bench", "--role", "tenant_admin")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    procs.append(Proc("server", [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"], env, tmp))
    procs.append(
        Proc(
            "worker",
            [str(VENV_BIN / "celery"), "-A", "scaiecho_site", "worker", "-n", f"bench-{port}@%h",
             "--concurrency=1", "--loglevel=WARNING"],
            env,
            tmp,
        )
    )

    # Load the direct side while the worker loads its own model.
    direct = Direct(args.model, wav)

    deadline = time.monotonic() + 180
    while True:
        for proc in procs:
            proc.check()
        try:
            ready = httpx.get(f"{base_url}/readyz", timeout=5)
            if ready.status_code == 200 and ready.json()["checks"].get("backends") == "ok":
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server/worker not ready within 180 s")
        time.sleep(0.3)

    pids = [proc.process.pid for proc in procs]
    bench = Bench(base_url, key, wav, db_path, pids)
    resp = bench.client.patch(f"{API}/tenant-policy", json={"allowed_backends": "A", "default_backend": "A"})
    if resp.status_code != 200:
        raise RuntimeError(f"tenant policy: {resp.status_code} {resp.text[:500]}")

    # Warm-up on a short clip: first-call costs (lazy imports, allocator, mel filters) are not API overhead.
    short = Bench(base_url, key, make_speech(4, tmp / "speech")[0], db_path, pids)
    short.api_sync()
    direct_short = Direct.__new__(Direct)
    direct_short.__dict__.update(direct.__dict__)
    direct_short.samples = direct.samples[: 16000 * 4]
    direct_short.engine_run()
    direct_short.whisper_run()

    modes = {
        "whisper": direct.whisper_run,
        "engine": direct.engine_run,
        "api-sync": bench.api_sync,
        "api-async": bench.api_async,
    }
    results: dict[str, list[Sample]] = {name: [] for name in modes}
    rng = random.Random(args.seed)
    print(f"audio {audio_s:.1f} s, model {args.model}, {args.runs} runs; setup {time.perf_counter() - t_start:.1f} s")
    for run in range(args.runs):
        order = list(modes) if run == 0 else rng.sample(list(modes), len(modes))
        for name in order:
            sample = modes[name]()
            results[name].append(sample)
            extra = "  ".join(f"{k} {v:.2f}" for k, v in sample.split.items())
            print(f"  run {run + 1} {name:<9} {sample.seconds:7.2f} s  cpu {sample.cpu_s:6.2f} s  {extra}", flush=True)

    med = {name: statistics.median(s.seconds for s in samples) for name, samples in results.items()}
    cpu = {name: statistics.median(s.cpu_s for s in samples) for name, samples in results.items()}
    print()
    print(f"audio seconds: {audio_s:.1f}   (direct decode of the WAV: {direct.decode_s * 1000:.0f} ms)")
    print(f"{'mode':<10} {'median s':>9} {'RTF':>6} {'÷whisper':>9} {'÷engine':>8} {'WER':>6} {'CPU s':>7} {'CPU÷engine':>10}")
    for name, samples in results.items():
        wer = statistics.mean(word_error_rate(reference, s.transcript) for s in samples)
        print(
            f"{name:<10} {med[name]:9.2f} {med[name] / audio_s:6.3f} {med[name] / med['whisper']:9.3f}"
            f" {med[name] / med['engine']:8.3f} {wer * 100:5.1f}% {cpu[name]:7.2f} {cpu[name] / cpu['engine']:10.3f}"
        )
    splits = {
        name: {k: statistics.median(s.split[k] for s in results[name]) for k in results[name][0].split}
        for name in ("api-sync", "api-async")
        if results[name][0].split and all(s.split for s in results[name])
    }
    for name, split in splits.items():
        print(f"{name} split (median s): " + "  ".join(f"{k} {v:.2f}" for k, v in split.items()))
        # Contention-robust view: wall time outside the worker's own work, added to the direct time.
        outside = statistics.median(s.seconds - s.split["work"] for s in results[name])
        print(f"  {name}: {outside:.2f} s outside the worker's work = {outside / med['engine'] * 100:.1f} % of engine time")
    print()
    for name in ("api-sync", "api-async"):
        for ref in ("whisper", "engine"):
            ratio = med[name] / med[ref]
            verdict = "MEETS" if ratio <= 1.10 else "MISSES"
            print(f"{verdict} the 10 % goal: {name} ÷ {ref} = {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
