"""What every backend engine shares: `BackendUnavailable` and the batching base class.

An engine implements `vqdiff.engine.Engine` (``backend``, ``provider``, ``encode_groups``,
``decode_groups``, ``code_indices``) plus ``encode_with_indices`` (latents and indices in one run),
``normalisation``, ``model_info`` and ``warmup``; a backend only writes ``_run_encoder`` and
``_run_decoder`` for one chunk of at most ``batch_size`` groups. numpy only: no backend is imported.
"""

from __future__ import annotations

import os

import numpy as np

from vqdiff.errors import VQDiffError

DEFAULT_BATCH = 256  # groups per run, except ONNX Runtime on the CPU (see `ort_backend.ORT_CPU_BATCH`)
DEFAULT_BUCKETS = (1, 8, 64, 512)  # batch sizes a CUDA graph engine captures (`torch_cuda`)


class BackendUnavailable(VQDiffError, RuntimeError):
    """The backend asked for cannot run here (package, device, files or provider missing)."""


def cuda_device(device: str | None) -> str:
    """The CUDA device a GPU engine runs on: ``device`` when it names one ("cuda:N"), else "cuda:0"
    (for "cuda", None, or a CPU device asked of a GPU variant)."""
    d = "" if device is None else str(device)
    return d if d.startswith("cuda:") else "cuda:0"


def check_buckets(buckets) -> tuple[int, ...]:
    """Sorted, distinct, positive batch sizes (the shapes a CUDA graph engine captures)."""
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise ValueError(f"buckets must be positive batch sizes, got {buckets!r}")
    return out


def bucket_for(n: int, buckets) -> int:
    """The smallest bucket that holds ``n`` groups (``n`` <= the largest bucket)."""
    buckets = check_buckets(buckets)
    if not 1 <= n <= buckets[-1]:
        raise ValueError(f"{n} groups do not fit the buckets {buckets}")
    return next(b for b in buckets if b >= n)


def bucket_chunks(n: int, buckets) -> list[tuple[int, int, int]]:
    """How ``n`` groups run on fixed-shape graphs: ``(start, stop, bucket)`` per chunk.

    Full chunks of the largest bucket, then the rest padded to the next bucket up; so at most
    ``bucket - (stop - start)`` padded groups are computed and thrown away, in the last chunk only.
    """
    buckets = check_buckets(buckets)
    top, out, start = buckets[-1], [], 0
    while n - start > top:
        out.append((start, start + top, top))
        start += top
    if n > start:
        out.append((start, n, bucket_for(n - start, buckets)))
    return out


class _GroupEngine:
    """Batching and the Engine protocol on top of ``_run_encoder`` / ``_run_decoder``."""

    backend = ""
    provider = ""
    name = ""

    def __init__(self, *, normalisation, model_info: dict, manifest: dict | None, batch_size: int):
        self.normalisation = normalisation
        self.model_info = dict(model_info)
        self.manifest = manifest
        self.batch_size = int(batch_size)
        self.has_indices = True

    # subclasses: (B,3,64,64) float32 -> (latents, indices|None); (B,D,16,16) -> (B,3,64,64)
    def _run_encoder(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _run_decoder(self, latents: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _check(a: np.ndarray, ndim: int, what: str) -> np.ndarray:
        a = np.asarray(a)
        if a.ndim != ndim:
            raise ValueError(f"expected {what} with {ndim} dimensions, got shape {a.shape}")
        return np.ascontiguousarray(a, dtype=np.float32)

    def encode_with_indices(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = self._check(x, 4, "groups (B, 3, 64, 64)")
        lat, idx = [], []
        for s in range(0, len(x), self.batch_size):
            lb, ib = self._run_encoder(x[s : s + self.batch_size])
            lat.append(lb)
            if ib is not None:
                idx.append(ib.astype(np.int64, copy=False))
        if not lat:
            raise ValueError("no groups to encode")
        return np.concatenate(lat), (np.concatenate(idx) if idx else None)

    def encode_groups(self, x: np.ndarray) -> np.ndarray:
        return self.encode_with_indices(x)[0]

    def code_indices(self, x: np.ndarray) -> np.ndarray | None:
        return self.encode_with_indices(x)[1]

    def decode_groups(self, latents: np.ndarray) -> np.ndarray:
        latents = self._check(latents, 4, "latents (B, D, 16, 16)")
        if not len(latents):
            raise ValueError("no latents to decode")
        return np.concatenate(
            [self._run_decoder(latents[s : s + self.batch_size]) for s in range(0, len(latents), self.batch_size)]
        )

    def warmup(self) -> None:
        x = np.zeros((1, 3, 64, 64), np.float32)
        lat, _ = self.encode_with_indices(x)
        self.decode_groups(lat)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} provider={self.provider} model={self.model_info.get('id')}>"


def load_checked(checkpoint_dir: str | os.PathLike, expected_sha256: str | None, precision: str):
    """The checkpoint behind a torch engine (CPU or CUDA), after the checks both make: a precision
    `vqdiff.torch_engine.TorchEngine` runs, and the weights the export was made from."""
    from vqdiff.checkpoint import load_checkpoint
    from vqdiff.torch_engine import PRECISIONS  # torch: imported only here, when a torch engine is made

    if precision not in PRECISIONS:
        raise ValueError(f"unknown torch precision {precision!r}; accepted: {list(PRECISIONS)}")
    ckpt = load_checkpoint(checkpoint_dir)
    if expected_sha256 and ckpt.model_hash != expected_sha256:
        raise BackendUnavailable(
            f"checkpoint {checkpoint_dir} has weights {ckpt.model_hash[:12]}, not the exported model's "
            f"{expected_sha256[:12]}; the torch backend needs the export's own source checkpoint"
        )
    return ckpt
