"""Live streaming benchmark: real-time speech over real WebSockets to one stream worker.

    .venv/bin/python -m bench.stream [--sessions 1,2,3,6] [--utterances 6] [--model base] [--engine NAME]

Self-contained like ``bench.batch`` (whose helpers it reuses): each session streams its own
conversation of ``--utterances`` clips of real recorded human speech (:mod:`bench.corpus`: LibriVox
and Asterisk prompts, 2-8 s each, separated by 1.2 s of silence, 1 s of trailing silence; concurrent
sessions say different things as far as the clips allow). It starts a real server (``manage.py
runserver``, i.e. daphne) against a throwaway data dir with no ``DATABASE_URL`` / ``REDIS_URL``:
with the in-memory channel layer the web process runs exactly one stream worker itself (one model,
one inference thread; ``--engine`` sets ``SCAIECHO_WHISPER_ENGINE``, ``--device``
``SCAIECHO_WHISPER_DEVICE``). It creates a tenant-admin key, sets the tenant policy to Backend A
only, opens one warm-up stream (the first stream loads the model), and then, for each concurrency
level k in ``--sessions``, opens k WebSocket sessions at once. Each sends its conversation as
100 ms ``audio/pcm`` frames at real-time pace (frame i leaves at t0 + (i + 1) * 0.1 s, sleeping to
that deadline), then ``close``, and records the arrival time of every frame the server sends.

``--set conversations`` streams the real-speech conversations of :mod:`tests.conversations`
instead (2-4 real people taking turns with 0.1-0.8 s gaps, some overlap and back-channel; the
issue's evaluation set; ``--band phone`` for their 8 kHz variant): session i streams conversation i.

Per session and reference utterance (stream times relative to the session's t0):

- final latency: arrival of the first final delta that covers the utterance's end (the first whose
  ``end`` reaches the utterance's end, less ``COVER_SLACK_S`` for word times) − (t0 + utterance end),
  so a final that spans two utterances counts for both,
- first partial (deltas matched to utterances by the overlap of their ``start``/``end``):
  arrival of the first delta of the utterance − (t0 + utterance start),
- last utterance: its final latency, and its final's arrival relative to ``close``,
- WER of the joined finals against the clips' text (the service's own WER),
- lag growth: mean final latency of the last third of utterances − that of the first third.

Targets (issue, 2-core CPU machine, model base): final p50 <= 1.5 s; first partial p50 <= 1.5 s;
last utterance final within 1.5 s of the end of its speech or of ``close``; ``--target`` (6)
concurrent sessions without growing lag and with final p50 <= 1.5 s. A level of k sessions "keeps
pace" when no final is missing and every session's lag growth < 0.5 s (the issue's "without
growing lag"), and "holds" when its p95 final is <= ``--max-p95`` (1.5 s) as well; each summary line
gives the largest k that qualifies with all smaller levels qualifying too.
At the end (``--no-profile`` skips it) one conversation runs through ``StreamSession`` in this
process to show the compute per decode, i.e. where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import numpy as np

from bench import corpus
from bench.batch import API, Proc, free_port, manage, run_with_procs, server_defaults, tree_cpu_s, word_error_rate
from bench.engines import EngineSpec, build

RATE = 16_000
FRAME_S = 0.1
GAP_S = 1.2
TRAIL_S = 1.0
LEAD_S = 0.5  # silence before the first utterance, so the VAD sees a speech onset
# A final "covers" an utterance's end when its end is at most this much before it: a final cut
# after the last word ends at that word's (approximate) end time.
COVER_SLACK_S = 0.3

# Targets from the issue (seconds).
FINAL_P50_TARGET = 1.5
FIRST_PARTIAL_TARGET = 1.5
LAST_TARGET = 1.5
LAG_GROWTH_TARGET = 0.5
# "Holds k sessions": p95 final latency bounded and lag not growing (``--max-p95`` changes it).
HOLD_P95_TARGET = 1.5
# Concurrent sessions one worker must carry on the 2-core machine (``--target`` changes it).
SESSIONS_TARGET = 6


# --- Audio -----------------------------------------------------------------------------------------


@dataclass
class Conversation:
    pcm: bytes
    sentences: list[str]
    spans: list[tuple[float, float]]  # (start, end) of each utterance's speech, stream seconds

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / RATE


def make_conversations(k: int, utterances: int, *, offset: int = 0) -> list[Conversation]:
    """``k`` conversations of real speech, as different from each other as the clips allow."""
    recs = corpus.conversations(k, utterances, lead_s=LEAD_S, gap_s=GAP_S, trail_s=TRAIL_S, offset=offset)
    return [Conversation(rec.pcm(), rec.texts, rec.spans) for rec in recs]


def real_conversations(k: int, band: str) -> list[Conversation]:
    """The first ``k`` transcribed conversations of the real-speech set (repeated when k is larger),
    with ``LEAD_S`` of silence before and ``TRAIL_S`` after."""
    from tests.conversations import conversations

    convs = conversations(band=band)  # type: ignore[arg-type]
    out = []
    for i in range(k):
        conv = convs[i % len(convs)]
        samples = np.concatenate([np.zeros(int(LEAD_S * RATE), np.float32), conv.samples, np.zeros(int(TRAIL_S * RATE), np.float32)])
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        out.append(Conversation(pcm, [t.text or "" for t in conv.turns], [(t.start + LEAD_S, t.end + LEAD_S) for t in conv.turns]))
    return out


# --- One session -----------------------------------------------------------------------------------


@dataclass
class Received:
    t: float  # perf_counter at arrival
    frame: dict


@dataclass
class SessionResult:
    conv: Conversation
    t0: float = 0.0  # perf_counter when the first frame's audio began (stream time 0)
    t_close: float = 0.0  # perf_counter when close was sent
    frames: list[Received] = field(default_factory=list)
    send_late_max: float = 0.0  # worst oversleep of the sender against its deadlines
    ready_s: float = 0.0  # open sent -> ready received
    error: str | None = None

    # derived
    final_lat: list[float | None] = field(default_factory=list)
    first_partial: list[float | None] = field(default_factory=list)
    last_vs_close: float | None = None
    wer: float = 0.0
    n_partials: int = 0
    n_finals: int = 0
    stray_finals: int = 0
    transcript: str = ""

    def analyse(self) -> None:
        spans = self.conv.spans
        deltas = [r for r in self.frames if r.frame.get("type") == "delta"]
        self.n_partials = sum(not r.frame["is_final"] for r in deltas)
        self.n_finals = sum(bool(r.frame["is_final"]) for r in deltas)
        first_any: list[float | None] = [None] * len(spans)
        covered: list[float | None] = [None] * len(spans)
        last_final_t: float | None = None
        for r in deltas:
            if r.frame["is_final"] and r.frame["text"].strip():
                last_final_t = r.t
                for i, (_, ue) in enumerate(spans):
                    if covered[i] is None and float(r.frame["end"]) >= ue - COVER_SLACK_S:
                        covered[i] = r.t
            s, e = float(r.frame["start"]), float(r.frame["end"])
            overlaps = [min(e, ue) - max(s, us) for us, ue in spans]
            best = max(range(len(spans)), key=lambda i: overlaps[i])
            if overlaps[best] <= 0:
                # No overlap (timestamps slightly off, or text invented in silence): nearest utterance.
                mid = (s + e) / 2
                best = min(range(len(spans)), key=lambda i: abs(mid - (spans[i][0] + spans[i][1]) / 2))
                if r.frame["is_final"] and not r.frame["text"].strip():
                    continue
                if r.frame["is_final"]:
                    self.stray_finals += 1
            if first_any[best] is None:
                first_any[best] = r.t
        self.final_lat = [None if t is None else t - (self.t0 + ue) for t, (_, ue) in zip(covered, spans, strict=True)]
        self.first_partial = [None if t is None else t - (self.t0 + us) for t, (us, _) in zip(first_any, spans, strict=True)]
        if covered[-1] is not None and last_final_t is not None:
            self.last_vs_close = last_final_t - self.t_close
        text = " ".join(r.frame["text"] for r in deltas if r.frame["is_final"])
        self.transcript = text
        self.wer = word_error_rate(" ".join(self.conv.sentences), text)

    @property
    def lag_growth(self) -> float | None:
        lat = [x for x in self.final_lat]
        third = max(1, len(lat) // 3)
        head, tail = lat[:third], lat[-third:]
        if any(x is None for x in head + tail):
            return None
        return statistics.mean(tail) - statistics.mean(head)  # type: ignore[arg-type]


async def run_session(url: str, conv: Conversation, start_at: float, result: SessionResult) -> None:
    import websockets

    done = asyncio.Event()

    async def reader(ws) -> None:
        async for message in ws:
            t = time.perf_counter()
            if isinstance(message, bytes):
                continue
            frame = json.loads(message)
            result.frames.append(Received(t, frame))
            if frame.get("type") == "error":
                result.error = f"{frame.get('code')}: {frame.get('message')}"
            if frame.get("type") in ("closed", "error"):
                done.set()
        done.set()

    async with websockets.connect(url, max_size=None, open_timeout=60, close_timeout=10) as ws:
        # All sessions of a level share start_at, so they really run at once. The wait comes
        # before ``open``: the worker's session clock starts at open, and audio that starts much
        # later looks like a worker running behind real time (it then skips partials).
        delay = start_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        opened = time.perf_counter()
        await ws.send(json.dumps({"type": "open", "media_type": "audio/pcm", "sample_rate": RATE, "language_hint": "en"}))
        ready = json.loads(await asyncio.wait_for(ws.recv(), 120))
        result.ready_s = time.perf_counter() - opened
        if ready.get("type") != "ready":
            result.error = f"{ready.get('code')}: {ready.get('message')}"  # e.g. RATE_LIMITED (bench.load counts it)
            raise RuntimeError(f"expected ready, got {ready}")
        read_task = asyncio.create_task(reader(ws))
        step = int(FRAME_S * RATE) * 2
        result.t0 = time.perf_counter()
        n = (len(conv.pcm) + step - 1) // step
        for i in range(n):
            deadline = result.t0 + min((i + 1) * step, len(conv.pcm)) / 2 / RATE
            wait = deadline - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            result.send_late_max = max(result.send_late_max, time.perf_counter() - deadline)
            await ws.send(conv.pcm[i * step : (i + 1) * step])
        result.t_close = time.perf_counter()
        await ws.send(json.dumps({"type": "close"}))
        try:
            await asyncio.wait_for(done.wait(), 60)
        finally:
            read_task.cancel()


async def run_level(url: str, convs: list[Conversation]) -> list[SessionResult]:
    results = [SessionResult(c) for c in convs]
    start_at = time.perf_counter() + 0.5  # time for all k handshakes
    outcomes = await asyncio.gather(
        *(run_session(url, c, start_at, r) for c, r in zip(convs, results, strict=True)), return_exceptions=True
    )
    for r, o in zip(results, outcomes, strict=True):
        if isinstance(o, BaseException):
            r.error = r.error or f"{type(o).__name__}: {o}"
        r.analyse()
    return results


# --- Report ----------------------------------------------------------------------------------------


def system_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat), to spot other load."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


@dataclass
class Level:
    k: int
    results: list[SessionResult]
    cpu_s: float
    wall_s: float
    other_s: float = 0.0  # CPU seconds of everything but the server and this process
    p95_bound: float = HOLD_P95_TARGET  # p95 final latency at most this for the level to "hold"

    def finals(self) -> list[float]:
        return [x for r in self.results for x in r.final_lat if x is not None]

    def missing(self) -> int:
        return sum(x is None for r in self.results for x in r.final_lat)

    def partials(self) -> list[float]:
        return [x for r in self.results for x in r.first_partial if x is not None]

    def lasts(self) -> list[float]:
        return [r.final_lat[-1] for r in self.results if r.final_lat and r.final_lat[-1] is not None]

    def last_close(self) -> list[float]:
        return [r.last_vs_close for r in self.results if r.last_vs_close is not None]

    def growths(self) -> list[float]:
        return [g for r in self.results if (g := r.lag_growth) is not None]

    def keeps_pace(self) -> bool:
        """The issue's measure: every final arrives and no session's lag grows."""
        g = self.growths()
        return bool(self.finals()) and not self.missing() and not any(r.error for r in self.results) and len(g) == self.k and max(g) < LAG_GROWTH_TARGET

    def holds(self) -> bool:
        f = self.finals()
        g = self.growths()
        return (
            bool(f) and not self.missing() and not any(r.error for r in self.results)
            and pct(f, 0.95) <= self.p95_bound and len(g) == self.k and max(g) < LAG_GROWTH_TARGET
        )


def print_level(level: Level, verbose: bool = False) -> None:
    print(f"\n== {level.k} concurrent session(s) ==  server CPU {level.cpu_s:.1f} s over {level.wall_s:.1f} s wall"
          f" ({level.cpu_s / level.wall_s * 100:.0f} % of one core); other processes"
          f" {level.other_s / level.wall_s * 100:.0f} % of one core"
          + ("  WARNING: the machine was busy with other work, numbers are pessimistic" if level.other_s / level.wall_s > 0.15 else ""))
    print(f"{'sess':>4} {'utterance final latency s (each)':<44} {'1st partial s (each)':<38} {'WER':>6}"
          f" {'lag+':>6} {'part':>5} {'fin':>4} {'late':>5}")
    for i, r in enumerate(level.results):
        lat = " ".join("  -- " if x is None else f"{x:5.2f}" for x in r.final_lat)
        fp = " ".join("  -- " if x is None else f"{x:5.2f}" for x in r.first_partial)
        g = r.lag_growth
        print(f"{i + 1:>4} {lat:<44} {fp:<38} {r.wer * 100:5.1f}% {'--' if g is None else f'{g:+.2f}':>6}"
              f" {r.n_partials:>5} {r.n_finals:>4} {r.send_late_max * 1000:4.0f}ms"
              + (f"  ERROR {r.error}" if r.error else ""))
    if verbose:
        for i, r in enumerate(level.results):
            print(f"  session {i + 1} spans " + " ".join(f"[{a:.2f},{b:.2f}]" for a, b in r.conv.spans))
            for x in r.frames:
                if x.frame.get("type") == "delta":
                    d = x.frame
                    print(f"    +{x.t - r.t0:6.2f}s {'F' if d['is_final'] else 'p'} [{d['start']:.2f},{d['end']:.2f}] {d['text']}")
    f, p, lasts, lc, g = level.finals(), level.partials(), level.lasts(), level.last_close(), level.growths()
    last_ok = all(min(a, b) <= LAST_TARGET for a, b in zip(lasts, lc, strict=False)) and len(lasts) == level.k
    wer = statistics.mean(r.wer for r in level.results)
    print(f"  final latency   p50 {pct(f, 0.5):5.2f} s  p95 {pct(f, 0.95):5.2f} s  max {max(f, default=float('nan')):5.2f} s"
          f"  missing {level.missing()}   [p50 <= {FINAL_P50_TARGET}: {verdict(pct(f, 0.5) <= FINAL_P50_TARGET)}]")
    print(f"  first partial   p50 {pct(p, 0.5):5.2f} s  p95 {pct(p, 0.95):5.2f} s"
          f"                        [p50 <= {FIRST_PARTIAL_TARGET}: {verdict(pct(p, 0.5) <= FIRST_PARTIAL_TARGET)}]")
    print(f"  last utterance  after its end {' '.join(f'{x:.2f}' for x in lasts)} s;"
          f" after close {' '.join(f'{x:+.2f}' for x in lc)} s   [<= {LAST_TARGET} of either: {verdict(last_ok)}]")
    print(f"  lag growth      {' '.join(f'{x:+.2f}' for x in g)} s (last third − first third)"
          f"   [< {LAG_GROWTH_TARGET}: {verdict(len(g) == level.k and max(g, default=0) < LAG_GROWTH_TARGET)}]")
    print(f"  WER             {wer * 100:.1f} %   stray finals {sum(r.stray_finals for r in level.results)}"
          f"   holds (p95 <= {level.p95_bound}, lag growth < {LAG_GROWTH_TARGET}): {'yes' if level.holds() else 'NO'}")


# --- Where the time goes --------------------------------------------------------------------------


def profile_decodes(conv: Conversation, spec: EngineSpec) -> None:
    """Run one conversation through :class:`StreamSession` in this process, 100 ms at a time as
    fast as it goes (the server is idle by then), and print what the worker's inference thread
    pays per decode: the compute floor under the latencies measured over the WebSocket."""
    from speech.transcriber import StreamSession

    engine = build(spec)
    engine.load()
    decoder = engine.stream_decoder()
    decoder.warm_up()
    session = StreamSession(engine, decoder=decoder, language="en")
    samples = np.frombuffer(conv.pcm, dtype="<i2").astype(np.float32) / 32768.0
    step = int(FRAME_S * RATE)
    feed_s: list[float] = []
    s0, m0 = system_busy_s(), time.process_time()
    t_all = time.perf_counter()
    for i in range(0, samples.size, step):
        t = time.perf_counter()
        session.feed(samples[i : i + step])
        feed_s.append(time.perf_counter() - t)
    session.close()
    wall = time.perf_counter() - t_all
    other = max(0.0, system_busy_s() - s0 - (time.process_time() - m0))
    spans = [a for a, _ in session.stats.samples]
    costs = [b for _, b in session.stats.samples]
    print(f"\nwhere the time goes (one session through StreamSession in this process, {spec.label}, no network):")
    if not costs:
        print("  no decodes")
        return
    print(f"  {session.stats.count} decodes for {conv.duration:.1f} s of audio; compute per decode p50 {pct(costs, 0.5):.2f} s,"
          f" p95 {pct(costs, 0.95):.2f} s, max {max(costs):.2f} s (spans {min(spans):.1f}-{max(spans):.1f} s)")
    print(f"  inference-thread busy {session.stats.seconds:.1f} s = {session.stats.seconds / conv.duration * 100:.0f} % of real time"
          f" per session (whole feed loop {wall:.1f} s) -> about {conv.duration / max(session.stats.seconds, 1e-9):.1f}"
          f" sessions fit one inference thread at 100 % busy, before any queueing delay")
    if other / wall > 0.15:
        print(f"  WARNING: other processes used {other / wall * 100:.0f} % of one core meanwhile; compute is inflated")
    by_len: dict[int, list[float]] = {}
    for a, b in session.stats.samples:
        by_len.setdefault(int(a), []).append(b)
    print("  compute by span length: " + ", ".join(f"{k}-{k + 1} s: {statistics.median(v):.2f} s (n={len(v)})" for k, v in sorted(by_len.items())))
    slow = sorted(feed_s, reverse=True)[:3]
    print(f"  slowest single feed() calls (a decode blocks every session queued behind it): {', '.join(f'{x:.2f}' for x in slow)} s")


# --- Main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,2,3,6", help="concurrency levels, comma-separated (default 1,2,3,6)")
    parser.add_argument("--utterances", type=int, default=6, help="utterances per conversation (default 6)")
    parser.add_argument("--set", dest="speech_set", choices=("clips", "conversations"), default="clips",
                        help="clips: --utterances clips 1.2 s apart (default); conversations: the real-speech"
                             " conversations of tests.conversations (0.1-0.8 s gaps, overlap, back-channel)")
    parser.add_argument("--redis", default=None, metavar="URL",
                        help="run with REDIS_URL=URL and a separate `manage.py stream_worker` process"
                             " (default: the embedded mode, the web process runs the stream worker)")
    parser.add_argument("--band", choices=("wideband", "phone"), default="wideband",
                        help="with --set conversations: wideband (16 kHz) or phone (8 kHz) variant")
    parser.add_argument("--model", default="base", help="Whisper model (default base)")
    parser.add_argument("--engine", default=None,
                        help="SCAIECHO_WHISPER_ENGINE for the server: ctranslate2 or openai-whisper (default: the settings')")
    parser.add_argument("--device", default="cpu", help="SCAIECHO_WHISPER_DEVICE for the server: cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="SCAIECHO_WHISPER_CPU_THREADS for the server (default 1)")
    parser.add_argument("--target", type=int, default=SESSIONS_TARGET,
                        help=f"sessions that must keep pace with final p50 <= {FINAL_P50_TARGET} s (default {SESSIONS_TARGET})")
    parser.add_argument("--max-p95", type=float, default=HOLD_P95_TARGET,
                        help=f"p95 final latency bound for a level to 'hold' (default {HOLD_P95_TARGET} s)")
    parser.add_argument("--stop-when-lost", action="store_true",
                        help="stop at the first level that does not hold (for rising levels such as 8,16,32,64)")
    parser.add_argument("--no-profile", action="store_true", help="skip the in-process decode profile at the end")
    parser.add_argument("--verbose", action="store_true", help="print every delta with its arrival time")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database) for inspection")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return 0 if run(parse_args(argv)) is not None else 130


def run(args: argparse.Namespace) -> list[Level] | None:
    """The whole benchmark; the levels measured, or ``None`` when interrupted (``bench.gpu`` uses it)."""
    levels = [int(x) for x in args.sessions.split(",") if x.strip()]
    return run_with_procs("scaiecho-bench-stream-", keep=args.keep, body=partial(_run, args, levels), interrupted=None)


def largest(done: list[Level], ok: Callable[[Level], bool]) -> int:
    """The largest k such that it and every smaller level tried satisfy ``ok``."""
    best = 0
    for lv in sorted(done, key=lambda lv: lv.k):
        if not ok(lv):
            break
        best = lv.k
    return best


def _run(args: argparse.Namespace, levels: list[int], tmp: Path, procs: list[Proc]) -> list[Level]:
    t_start = time.perf_counter()
    n = args.utterances
    if args.speech_set == "conversations":
        convs = real_conversations(max(levels), args.band)
    else:
        convs = make_conversations(max(levels), n)
    warm = make_conversations(1, 1, offset=max(levels) * n)[0]
    defaults = server_defaults()
    engine = args.engine or defaults.engine

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env.update({
        "SCAIECHO_DATA_DIR": str(tmp / "data"),
        "SCAIECHO_WHISPER_MODEL": args.model,
        "SCAIECHO_WHISPER_ENGINE": engine,
        "SCAIECHO_WHISPER_DEVICE": args.device,
        "SCAIECHO_WHISPER_CPU_THREADS": str(args.threads),
        "OMP_NUM_THREADS": str(args.threads),
        "SCAIECHO_RATELIMIT_PER_KEY": "100000",
        "SCAIECHO_RATELIMIT_PER_USER": "100000",
        "SCAIECHO_RATELIMIT_PER_TENANT": "100000",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    if args.redis:
        env["REDIS_URL"] = args.redis
    manage(env, "migrate", "--noinput", "-v", "0")
    key = manage(env, "create_api_key", "--tenant", "bench", "--user", "bench", "--role", "tenant_admin")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = Proc("server", [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"], env, tmp)
    procs.append(server)
    if args.redis:
        worker = Proc("stream_worker", [sys.executable, "manage.py", "stream_worker"], env, tmp)
        procs.append(worker)
        deadline = time.monotonic() + 120
        while b" ready" not in worker.log_path.read_bytes():
            worker.check()
            if time.monotonic() > deadline:
                raise RuntimeError("stream worker not ready within 120 s")
            time.sleep(0.3)
    deadline = time.monotonic() + 120
    while True:
        server.check()
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server not up within 120 s")
        time.sleep(0.3)
    resp = httpx.patch(f"{base}{API}/tenant-policy", headers={"Authorization": f"Bearer {key}"},
                       json={"allowed_backends": "A", "default_backend": "A"}, timeout=30)
    if resp.status_code != 200:
        raise RuntimeError(f"tenant policy: {resp.status_code} {resp.text[:500]}")
    url = f"ws://127.0.0.1:{port}{API}/stream/transcribe?token={key}"

    t0 = time.perf_counter()
    warm_result = asyncio.run(run_level(url, [warm]))[0]
    if warm_result.error:
        raise RuntimeError(f"warm-up stream failed: {warm_result.error}\n{server.log_path.read_text()[-3000:]}")
    mode = f"Redis {args.redis} + a separate stream worker" if args.redis else "embedded stream worker (no REDIS_URL)"
    print(f"{mode}; {'the real-speech conversations (' + args.band + ')' if args.speech_set == 'conversations' else 'clips'}")
    print(f"engine {engine}, model {args.model} on {args.device}, {args.threads} inference thread(s); real speech,"
          f" {n} utterances per session, {convs[0].duration:.1f} s of audio in session 1;"
          f" first stream after start-up: ready in {warm_result.ready_s:.2f} s, first delta"
          f" {'--' if not warm_result.first_partial or warm_result.first_partial[0] is None else f'{warm_result.first_partial[0]:.2f}'} s"
          f" after its speech began, whole stream {time.perf_counter() - t0:.1f} s; setup {time.perf_counter() - t_start:.1f} s")
    if not corpus.has_asterisk():
        print(f"note: only the LibriVox clips are installed, so sessions repeat them; for more: {corpus.INSTALL_HINT}")
    print("latencies: seconds from the end (final) / start (first partial) of each utterance in the stream;"
          " 'late' = sender's worst oversleep")

    done: list[Level] = []
    pid = [proc.process.pid for proc in procs]  # the server, and the stream worker with --redis
    for k in levels:
        server.check()
        c0, w0, s0, m0 = tree_cpu_s(pid), time.perf_counter(), system_busy_s(), tree_cpu_s([os.getpid()])
        results = asyncio.run(run_level(url, convs[:k]))
        server_s = tree_cpu_s(pid) - c0
        other = system_busy_s() - s0 - server_s - (tree_cpu_s([os.getpid()]) - m0)
        level = Level(k, results, server_s, time.perf_counter() - w0, max(0.0, other), args.max_p95)
        done.append(level)
        print_level(level, args.verbose)
        sys.stdout.flush()
        if args.stop_when_lost and not level.holds():
            print(f"  (stopping: {k} sessions do not hold)")
            break

    held = [lv.k for lv in done if lv.holds()]
    holds = largest(done, Level.holds)
    paced = largest(done, Level.keeps_pace)
    print()
    print(f"sessions one worker holds without growing lag (the issue's measure): {paced}")
    print(f"sessions one worker holds with final p95 <= {args.max_p95} s as well (stricter): {holds}"
          f" (levels holding: {', '.join(map(str, held)) or 'none'})")
    one = next((lv for lv in done if lv.k == 1), None)
    if one:
        f, p = one.finals(), one.partials()
        print(f"single session: final p50 {pct(f, 0.5):.2f} s [target <= {FINAL_P50_TARGET}: {verdict(pct(f, 0.5) <= FINAL_P50_TARGET)}],"
              f" first partial p50 {pct(p, 0.5):.2f} s [target <= {FIRST_PARTIAL_TARGET}: {verdict(pct(p, 0.5) <= FIRST_PARTIAL_TARGET)}]")
    target = next((lv for lv in done if lv.k == args.target), None)
    if target is None:
        print(f"MISS target: {args.target} concurrent sessions without growing lag and final p50 <= {FINAL_P50_TARGET} s"
              f" (not measured: add {args.target} to --sessions)")
    else:
        p50 = pct(target.finals(), 0.5)
        ok = paced >= args.target and p50 <= FINAL_P50_TARGET
        print(f"{'PASS' if ok else 'MISS'} target: {args.target} concurrent sessions without growing lag"
              f" [{verdict(paced >= args.target)}] and final p50 <= {FINAL_P50_TARGET} s [{p50:.2f} s: {verdict(p50 <= FINAL_P50_TARGET)}]")
    if not args.no_profile:
        for proc in procs:
            proc.stop()
        procs.clear()
        compute = defaults.compute_type or ("int8" if args.device == "cpu" else "float16")
        spec = EngineSpec(f"{engine} engine", engine, args.model, args.device, args.threads,
                          compute if engine == "ctranslate2" else None, defaults.batch_size if engine == "ctranslate2" else None)
        profile_decodes(convs[0], spec)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return done


if __name__ == "__main__":
    sys.exit(main())
