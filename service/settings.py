"""The service's settings: environment variables, each declared once in `TABLE` (name, default,
meaning), read once into `Settings`. The README's table is `markdown_table()` (a test checks it;
``python -m vqdiff.service.settings`` prints it)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from vqdiff.geometry import GROUP_SIZE

log = logging.getLogger("bentoml.vqdiff")

# name, default (as documented), meaning
TABLE: tuple[tuple[str, str, str], ...] = (
    ("VQDIFF_MODEL", "models/default", "checkpoint or export directory to serve"),
    ("VQDIFF_MODEL_TAG", "(unset)", "a BentoML model-store tag (`vqdiff:latest`); wins over VQDIFF_MODEL "
     "(import one with `vqdiff-model-store`)"),
    ("VQDIFF_ENGINE", "auto", "engine variant (read by `vqdiff.export.select`, docs/engines.md): `auto` = the "
     "fastest that passes the quality gate here, or one of its names (`ort-fp32`, `torch-fp32`, ...)"),
    ("VQDIFF_DEVICE", "(auto)", "`cpu` or `cuda[:N]` (auto: the GPU when there is one)"),
    ("VQDIFF_WORKERS", "(auto)", "worker processes, each with its own engine and batcher; auto: 1 on a GPU "
     "host (every request's groups meet in one engine), else one per CPU core"),
    ("VQDIFF_THREADS", "(auto)", "engine threads per worker (auto: CPU cores / workers)"),
    ("VQDIFF_IO_THREADS", "2", "threads per worker that parse uploads, canonicalise and write answers"),
    ("VQDIFF_MAX_BATCH_GROUPS", "64", "micro-batching: most groups in one engine call (larger requests "
     "are cut into pieces of this size)"),
    ("VQDIFF_MAX_BATCH_WAIT_MS", "2", "micro-batching: most an idle engine waits for other requests' "
     "groups before it runs (0: never; a busy engine batches what queued meanwhile)"),
    ("VQDIFF_TIMEOUT_S", "120", "request timeout (BentoML `traffic.timeout`)"),
    ("VQDIFF_MAX_CONCURRENCY", "64", "API requests in flight (split over the workers); past it a 503 with "
     "`Retry-After` at once"),
    ("VQDIFF_MAX_UPLOAD_MB", "64", "largest request body (413 beyond)"),
    ("VQDIFF_MAX_STREAMLINES", "200000", "most streamlines in one request (413 beyond)"),
    ("VQDIFF_API_TOKEN", "(unset)", "when set, every route but /livez, /readyz, /healthz and /metrics needs "
     "`Authorization: Bearer <token>`"),
    ("VQDIFF_DRAIN_S", "25", "graceful stop on SIGTERM: /readyz and new requests 503 + `Retry-After`, "
     "requests in flight finish, the workers exit within this time (give the orchestrator longer)"),
    ("VQDIFF_HEAP_TRIM_S", "2", "while requests come, return free heap pages to the OS this often "
     "(glibc `malloc_trim`; 0: never): bounds the RSS under ever-different batch sizes"),
)
# names of earlier releases: still honoured where the concept is the same, with a warning
RENAMED = {"VQDIFF_GATEWAY_WORKERS": "VQDIFF_WORKERS", "VQDIFF_GATEWAY_THREADS": "VQDIFF_IO_THREADS"}
GONE = {"VQDIFF_BACKEND": "VQDIFF_ENGINE (an engine variant name)",
        "VQDIFF_MAX_LATENCY_MS": "VQDIFF_TIMEOUT_S (no second service any more)"}


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{name}` | {default} | {meaning} |" for name, default, meaning in TABLE]
    return "\n".join(rows)


def _env(name: str, env) -> str:
    value = (env.get(name) or "").strip()
    old = next((o for o, new in RENAMED.items() if new == name), None)
    if not value and old and (env.get(old) or "").strip():
        log.warning("%s is now called %s; honouring it", old, name)
        value = env[old].strip()
    return value


def _number(name: str, env, default, *, minimum: float, cast=int):
    raw = _env(name, env)
    if not raw:
        return default
    try:
        value = cast(float(raw))
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from exc
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw} must be >= {minimum}")
    return value


def gpu_host(device: str | None) -> bool:
    """Whether the engine will run on a GPU: ``VQDIFF_DEVICE`` says so, or (unset) an NVIDIA GPU is
    present. Decided without importing torch (the worker count is needed before any engine loads)."""
    if device:
        return device.startswith("cuda")
    import shutil
    from pathlib import Path

    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").exists() or bool(shutil.which("nvidia-smi"))


@dataclass(frozen=True)
class Settings:
    model_path: str | None
    model_tag: str | None
    device: str | None
    workers: int
    threads: int
    io_threads: int
    max_batch_groups: int
    max_batch_wait_ms: float
    timeout_s: float
    max_concurrency: int
    max_upload_bytes: int
    max_streamlines: int
    api_token: str | None
    drain_s: float
    heap_trim_s: float

    @property
    def max_groups(self) -> int:
        """Most groups one request may carry (decode side of the streamline limit)."""
        return -(-self.max_streamlines // GROUP_SIZE)

    @property
    def max_points(self) -> int:
        """Most points a decoded bundle may have: what the largest accepted upload could hold."""
        return max(self.max_upload_bytes // 12, self.max_streamlines * 64)

    @property
    def max_in_flight(self) -> int:
        """The concurrency limit of one worker."""
        return -(-self.max_concurrency // self.workers)

    @classmethod
    def from_env(cls, env=None) -> Settings:
        env = os.environ if env is None else env
        for old, new in GONE.items():
            if (env.get(old) or "").strip():
                log.warning("%s is no longer read; use %s", old, new)
        device = _env("VQDIFF_DEVICE", env) or None
        cores = os.cpu_count() or 1
        workers = _number("VQDIFF_WORKERS", env, 1 if gpu_host(device) else cores, minimum=1)
        return cls(
            model_path=_env("VQDIFF_MODEL", env) or None,
            model_tag=_env("VQDIFF_MODEL_TAG", env) or None,
            device=device,
            workers=workers,
            threads=_number("VQDIFF_THREADS", env, max(1, cores // workers), minimum=1),
            io_threads=_number("VQDIFF_IO_THREADS", env, 2, minimum=1),
            max_batch_groups=_number("VQDIFF_MAX_BATCH_GROUPS", env, 64, minimum=1),
            max_batch_wait_ms=_number("VQDIFF_MAX_BATCH_WAIT_MS", env, 2.0, minimum=0, cast=float),
            timeout_s=_number("VQDIFF_TIMEOUT_S", env, 120.0, minimum=1, cast=float),
            max_concurrency=_number("VQDIFF_MAX_CONCURRENCY", env, 64, minimum=1),
            max_upload_bytes=int(_number("VQDIFF_MAX_UPLOAD_MB", env, 64.0, minimum=0.001, cast=float) * (1 << 20)),
            max_streamlines=_number("VQDIFF_MAX_STREAMLINES", env, 200_000, minimum=1),
            api_token=_env("VQDIFF_API_TOKEN", env) or None,
            drain_s=_number("VQDIFF_DRAIN_S", env, 25.0, minimum=1, cast=float),
            heap_trim_s=_number("VQDIFF_HEAP_TRIM_S", env, 2.0, minimum=0, cast=float),
        )

    def public(self) -> dict:
        """What `GET /model` shows (never the token)."""
        out = {k: getattr(self, k) for k in ("max_upload_bytes", "max_streamlines", "max_batch_groups",
                                             "max_batch_wait_ms", "timeout_s", "max_concurrency", "workers",
                                             "threads", "io_threads", "drain_s")}
        return {**out, "auth": "bearer" if self.api_token else "none"}


SETTINGS = Settings.from_env()

if __name__ == "__main__":
    print(markdown_table())
