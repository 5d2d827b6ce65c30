"""The service's settings: environment variables, each declared once in `TABLE` and read once into
`SETTINGS`. The README's table is `markdown_table()` (a test checks it; ``python -m
vqdiff.service.settings`` prints it)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

from vqdiff.geometry import GROUP_SIZE

log = logging.getLogger("bentoml.vqdiff")

_INT, _POS, _NONNEG, _TEXT = (int, 1), (float, 1e-3), (float, 0.0), (str, None)  # (type, minimum)
# variable, attribute (None: read elsewhere), (type, minimum), default (None: auto), default as documented, meaning
TABLE = (
    ("VQDIFF_MODEL", "model_path", _TEXT, None, "models/default", "checkpoint or export directory to serve"),
    ("VQDIFF_MODEL_TAG", "model_tag", _TEXT, None, "(unset)", "a BentoML model-store tag (`vqdiff:latest`); wins "
     "over VQDIFF_MODEL (import one with `vqdiff-model-store`)"),
    ("VQDIFF_ENGINE", None, _TEXT, None, "auto", "engine variant (`vqdiff.engine.engine_choice`, checked at start; "
     "docs/engines.md): "
     "`auto` = the fastest that passes the quality gate on this machine, or a variant name (`ort-fp32`, ...)"),
    ("VQDIFF_DEVICE", "device", _TEXT, None, "(auto)", "`cpu` or `cuda[:N]` (auto: the GPU when there is one)"),
    ("VQDIFF_WORKERS", "workers", _INT, None, "(auto)", "worker processes, each with its own engine and "
     "micro-batcher; auto: 1 on a GPU host (every request's groups meet in one engine), else one per 4 CPU cores"),
    ("VQDIFF_THREADS", "threads", _INT, None, "(auto)", "engine threads per worker (auto: its share of the CPU cores)"),
    ("VQDIFF_IO_THREADS", "io_threads", _INT, 2, "2", "threads per worker that parse uploads, canonicalise and "
     "write answers"),
    ("VQDIFF_MAX_BATCH_GROUPS", "max_batch_groups", _INT, 64, "64", "micro-batching: most groups in one engine call "
     "(a larger request is cut into pieces of this size)"),
    ("VQDIFF_MAX_BATCH_WAIT_MS", "max_batch_wait_ms", _NONNEG, None, "(auto)", "micro-batching: most an idle engine waits for "
     "other requests' groups (0: never; a busy engine batches what queued meanwhile); auto: 2 on a GPU host, 0 on a CPU one "
     "(its cost per group is the same in calls of 5 to 64 groups: a wait only delays)"),
    ("VQDIFF_TIMEOUT_S", "timeout_s", _POS, 120.0, "120", "request timeout (BentoML `traffic.timeout`)"),
    ("VQDIFF_MAX_CONCURRENCY", "max_concurrency", _INT, 64, "64", "API requests in flight (shared out over the "
     "workers); past it a 503 with `Retry-After` at once"),
    ("VQDIFF_MAX_UPLOAD_MB", "max_upload_mb", _POS, 64.0, "64", "largest request body (413 beyond)"),
    ("VQDIFF_MAX_STREAMLINES", "max_streamlines", _INT, 200000, "200000", "most streamlines in one request (413 "
     "beyond)"),
    ("VQDIFF_MAX_BUNDLES", "max_bundles", _INT, 100, "100", "most bundles in one request: 'file' parts of /encode and "
     "/reconstruct, groups of a TRX, bundles of a subject file (413 beyond)"),
    ("VQDIFF_NORMS", "norms", _TEXT, None, "(unset)", "a norms file from `vqdiff-norms fit`, loaded at start, "
     "for POST /score (unset: /score answers 503 saying so)"),
    ("VQDIFF_API_TOKEN", "api_token", _TEXT, None, "(unset)", "when set, every route but /livez, /readyz, /healthz "
     "and /metrics needs `Authorization: Bearer <token>`"),
    ("VQDIFF_DRAIN_S", "drain_s", _POS, 25.0, "25", "graceful stop on SIGTERM: /readyz and new requests 503 + "
     "`Retry-After`, requests in flight finish, workers exit within this time (give the orchestrator longer)"),
    ("VQDIFF_HEAP_TRIM_S", "heap_trim_s", _NONNEG, 2.0, "2", "while the engine works, return free heap pages to the "
     "OS this often (glibc `malloc_trim`; 0: never): bounds the RSS under ever-different batch sizes"),
)
# names of earlier releases: honoured where the concept is the same, else refused naming the new one
RENAMED = {"VQDIFF_GATEWAY_WORKERS": "VQDIFF_WORKERS", "VQDIFF_GATEWAY_THREADS": "VQDIFF_IO_THREADS"}
GONE = {"VQDIFF_BACKEND": "VQDIFF_ENGINE (a variant name)", "VQDIFF_MAX_LATENCY_MS": "VQDIFF_TIMEOUT_S"}


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    return "\n".join(rows + [f"| `{name}` | {shown} | {meaning} |" for name, _, _, _, shown, meaning in TABLE])


def _read(name: str, env, kind) -> str | int | float | None:
    raw = (env.get(name) or "").strip()
    old = next((o for o, new in RENAMED.items() if new == name and (env.get(o) or "").strip()), None)
    if not raw and old:
        log.warning("%s is now called %s; honouring it", old, name)
        raw = env[old].strip()
    cast, minimum = kind
    if not raw or cast is str:
        return raw or None
    try:
        value = cast(float(raw))
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from exc
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw} must be >= {minimum}")
    return value


def gpu_host(device: str | None) -> bool:
    """Whether the engine will run on a GPU: ``VQDIFF_DEVICE`` says so or, unset, an NVIDIA GPU is
    present (decided without importing torch: the worker count is needed before any engine loads)."""
    if device:
        return device.startswith("cuda")
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/proc/driver/nvidia/gpus")) or bool(shutil.which("nvidia-smi"))


class Settings(SimpleNamespace):
    """One attribute per `TABLE` row, plus the limits derived from them."""

    @classmethod
    def from_env(cls, env=None) -> Settings:
        env = os.environ if env is None else env
        from vqdiff.engine import engine_choice

        for old, new in GONE.items():
            if (env.get(old) or "").strip():
                raise ValueError(f"environment variable {old} is no longer read; use {new}")
        try:  # read once here so that a wrong name stops the start, with the valid ones
            values = {"engine": engine_choice((env.get("VQDIFF_ENGINE") or "").strip() or "auto")}
        except ValueError as exc:
            raise ValueError(f"environment variable VQDIFF_ENGINE: {exc}") from exc
        for name, attr, kind, default, _, _ in TABLE:
            if attr is not None:
                value = _read(name, env, kind)
                values[attr] = default if value is None else value
        gpu, cores = gpu_host(values["device"]), os.cpu_count() or 1
        values["workers"] = values["workers"] or (1 if gpu else max(1, cores // 4))
        values["threads"] = values["threads"] or max(1, cores // values["workers"])
        values["max_batch_wait_ms"] = (2.0 if gpu else 0.0) if values["max_batch_wait_ms"] is None else values["max_batch_wait_ms"]
        return cls(**values)

    max_upload_bytes = property(lambda self: int(self.max_upload_mb * (1 << 20)))
    # the decode side of the streamline limit; the points a decoded bundle may have: what the largest upload holds
    max_groups = property(lambda self: -(-self.max_streamlines // GROUP_SIZE))
    max_points = property(lambda self: max(self.max_upload_bytes // 12, self.max_streamlines * 64))
    max_in_flight = property(lambda self: -(-self.max_concurrency // self.workers))  # one worker's limit

    def public(self) -> dict:  # what `GET /model` shows (never the token)
        out = {k: getattr(self, k) for k in ("max_upload_bytes", "max_streamlines", "max_bundles", "max_batch_groups", "max_batch_wait_ms",
                                             "timeout_s", "max_concurrency", "workers", "threads", "io_threads", "drain_s")}
        return {**out, "auth": "bearer" if self.api_token else "none"}


SETTINGS = Settings.from_env()

if __name__ == "__main__":
    print(markdown_table())
