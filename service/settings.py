"""Service settings, read once from environment variables (all optional).

=============================  ==========  ===================================================
variable                       default     meaning
=============================  ==========  ===================================================
VQDIFF_MODEL                   models/     checkpoint directory or export directory to serve
                               default
VQDIFF_MODEL_TAG               (unset)     a BentoML model-store tag (``vqdiff:latest``); wins
                                           over VQDIFF_MODEL (import one with
                                           ``python -m vqdiff.service.store``)
VQDIFF_BACKEND                 auto        auto | tensorrt | ort-cuda | ort-cpu | torch
VQDIFF_DEVICE                  (auto)      e.g. ``cpu`` or ``cuda:0`` (auto: GPU when usable)
VQDIFF_THREADS                 (cores)     intra-op threads of the model worker
VQDIFF_MAX_BATCH_GROUPS        64          adaptive batching: most groups in one batch
VQDIFF_MAX_LATENCY_MS          30000       adaptive batching: latency budget of one batch
VQDIFF_MAX_BATCH_WAIT_MS       50          adaptive batching: most a request waits for others
VQDIFF_GATEWAY_WORKERS         2           gateway processes (parsing, canonicalisation)
VQDIFF_GATEWAY_THREADS         2           CPU threads per gateway process (parse, write)
VQDIFF_TIMEOUT_S               120         gateway request timeout (model: 3/4 of it)
VQDIFF_MAX_CONCURRENCY         64          gateway requests in flight per service (then 503)
VQDIFF_MAX_UPLOAD_MB           64          largest request body (413 beyond)
VQDIFF_MAX_STREAMLINES         200000      most streamlines in one request (413 beyond)
VQDIFF_API_TOKEN               (unset)     when set, every route but /livez, /readyz, /healthz
                                           and /metrics needs ``Authorization: Bearer <token>``
VQDIFF_DRAIN_S                 25          graceful stop on SIGTERM: requests in flight finish,
                                           new ones get 503 + Retry-After, /readyz 503; the
                                           workers exit within this time (give the orchestrator
                                           a longer grace: Kubernetes 30 s default, docker stop -t)
VQDIFF_HEAP_TRIM_S             2           while requests come, return the heap's free pages to
                                           the OS this often (glibc malloc_trim; 0: never): bounds
                                           the RSS of workers serving ever-different batch sizes
=============================  ==========  ===================================================

Memory, without a setting: a finished request lets go of its body (`service.lifecycle.ReleaseBody`;
before it, each gateway worker kept the uploads of its last 90 s alive: 240 MB -> 0.9-1.3 GB of RSS
in two minutes of 8-16 clients). glibc's own variables reach every worker as they are (``bentoml
serve`` and the container pass the environment on), but none is needed for the RSS to stay within
+25 % after the warm-up (``benchmarks/bench_soak.py`` checks it) and they cost CPU:
``MALLOC_MMAP_THRESHOLD_=131072`` (big blocks mmapped, so freed at once) narrows the RSS swings,
measured at +70 % gateway CPU per request and 2-2.7x the CPU of the torch engine (every block
page-faulted afresh); ``MALLOC_ARENA_MAX`` changed nothing measurable (the torch engine allocates
from one arena).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vqdiff.geometry import GROUP_SIZE


def _int(name: str, default: int, *, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from exc
    if value < minimum:
        raise ValueError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from exc
    if minimum is None and value <= 0:
        raise ValueError(f"environment variable {name}={value} must be > 0")
    if minimum is not None and value < minimum:
        raise ValueError(f"environment variable {name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    model_path: str | None
    model_tag: str | None
    backend: str
    device: str | None
    threads: int | None
    max_batch_groups: int
    max_latency_ms: int
    max_batch_wait_ms: int
    gateway_workers: int
    gateway_threads: int
    timeout_s: float
    max_concurrency: int
    max_upload_bytes: int
    max_streamlines: int
    api_token: str | None
    drain_s: float = 25.0
    heap_trim_s: float = 2.0

    @property
    def max_groups(self) -> int:
        """Most groups one request may carry (decode side of the streamline limit)."""
        return -(-self.max_streamlines // GROUP_SIZE)

    @property
    def max_points(self) -> int:
        """Most points a decoded bundle may have: what the largest accepted upload could hold."""
        return max(self.max_upload_bytes // 12, self.max_streamlines * 64)

    @property
    def model_timeout_s(self) -> float:
        return max(1.0, 0.75 * self.timeout_s)

    @classmethod
    def from_env(cls) -> Settings:
        threads = os.environ.get("VQDIFF_THREADS", "").strip()
        return cls(
            model_path=os.environ.get("VQDIFF_MODEL") or None,
            model_tag=os.environ.get("VQDIFF_MODEL_TAG") or None,
            backend=(os.environ.get("VQDIFF_BACKEND") or "auto").strip().lower(),
            device=os.environ.get("VQDIFF_DEVICE") or None,
            threads=_int("VQDIFF_THREADS", 1) if threads else None,
            max_batch_groups=_int("VQDIFF_MAX_BATCH_GROUPS", 64),
            max_latency_ms=_int("VQDIFF_MAX_LATENCY_MS", 30_000, minimum=10),
            max_batch_wait_ms=_int("VQDIFF_MAX_BATCH_WAIT_MS", 50, minimum=0),
            gateway_workers=_int("VQDIFF_GATEWAY_WORKERS", 2),
            gateway_threads=_int("VQDIFF_GATEWAY_THREADS", 2),
            timeout_s=_float("VQDIFF_TIMEOUT_S", 120.0),
            max_concurrency=_int("VQDIFF_MAX_CONCURRENCY", 64),
            max_upload_bytes=int(_float("VQDIFF_MAX_UPLOAD_MB", 64.0) * (1 << 20)),
            max_streamlines=_int("VQDIFF_MAX_STREAMLINES", 200_000),
            api_token=(os.environ.get("VQDIFF_API_TOKEN") or "").strip() or None,
            drain_s=_float("VQDIFF_DRAIN_S", 25.0),
            heap_trim_s=_float("VQDIFF_HEAP_TRIM_S", 2.0, minimum=0.0),
        )

    def public(self) -> dict:
        """What `GET /model` shows (never the token)."""
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_streamlines": self.max_streamlines,
            "max_batch_groups": self.max_batch_groups,
            "max_latency_ms": self.max_latency_ms,
            "max_batch_wait_ms": self.max_batch_wait_ms,
            "timeout_s": self.timeout_s,
            "gateway_workers": self.gateway_workers,
            "gateway_threads": self.gateway_threads,
            "drain_s": self.drain_s,
            "auth": "bearer" if self.api_token else "none",
        }


SETTINGS = Settings.from_env()
