"""One runtime interface over every backend: TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU -> torch.

>>> from vqdiff.export.runtime import load_engine, make_codec
>>> engine = load_engine("exports/default")                   # best available backend
>>> engine.backend, engine.provider, engine.name               # ('onnxruntime', 'CPUExecutionProvider', 'ort-cpu')
>>> codec = make_codec("exports/default", backend="ort-cpu")   # a vqdiff.api.Codec on that engine

Every engine implements `vqdiff.engine.Engine` (``backend``, ``provider``, ``encode_groups``,
``decode_groups``, ``code_indices``) plus ``encode_with_indices`` (latents and indices in one run),
``normalisation`` and ``model_info`` (``{"id", "kind", "sha256"}``, the sha256 being that of the
source checkpoint's weights, so latents made by one backend decode with any other backend of the
same model, torch included).

``path`` is an export directory (with ``manifest.json``) or a checkpoint directory. A checkpoint
directory only has the torch backend (ONNX Runtime and TensorRT need an export: ``vqdiff-export``);
the torch backend of an export directory needs its source checkpoint (recorded in the manifest,
checked by sha256).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from vqdiff.errors import VQDiffError

from .manifest import DEC_INPUT, DECODER, ENC_INPUT, ENCODER, is_export_dir, model_info, read_manifest

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "ort-cuda", "ort-cpu", "torch")  # the auto order
DEFAULT_BATCH = 256
# ONNX Runtime on the CPU runs fastest on small chunks: the activations of a few groups stay in cache
# (measured on the 2-core AVX-512 machine: ~460 groups/s in chunks of 4-8 against ~250 in chunks of 64)
ORT_CPU_BATCH = 8


class BackendUnavailable(VQDiffError, RuntimeError):
    """The backend asked for cannot run here (package, device, files or provider missing)."""


# ----------------------------------------------------------------------------- shared behaviour
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


# ----------------------------------------------------------------------------- ONNX Runtime
_LEVELS = ("disable", "basic", "extended", "all")


def ort_session(path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                inter_threads: int | None = None, level: str = "all", spinning: bool | None = None):
    """An `onnxruntime.InferenceSession` on ``device`` ("cpu" or "cuda[:N]"), provider asserted.

    ONNX Runtime silently falls back to the CPU when the CUDA provider cannot be created (it only logs
    a warning); here that raises `BackendUnavailable`. ``spinning`` (busy-waiting intra-op threads)
    defaults to off on the CPU: measured 2x faster at batch 1 on the shared 2-core machine.
    """
    import onnxruntime as ort

    if level not in _LEVELS:
        raise ValueError(f"unknown graph optimisation level {level!r}; accepted: {list(_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a chain of convs: no inter-op parallelism to use
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = int(inter_threads or 1)
    if spinning is None and not device.startswith("cuda"):
        spinning = False  # busy-waiting threads only steal CPU from the rest of a (shared) machine
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    if device.startswith("cuda"):
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                f"ONNX Runtime has no CUDAExecutionProvider here (available: {available}); "
                "install onnxruntime-gpu instead of onnxruntime"
            )
        device_id = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        want = "CUDAExecutionProvider"
    else:
        providers = ["CPUExecutionProvider"]
        want = "CPUExecutionProvider"
    sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    active = sess.get_providers()
    if not active or active[0] != want:
        raise BackendUnavailable(f"asked ONNX Runtime for {want} but the session runs on {active} "
                                 "(the CUDA provider failed to load: check CUDA / cuDNN libraries)")
    return sess


class OrtEngine(_GroupEngine):
    """Runs ``encoder.onnx`` / ``decoder.onnx`` (or a variant) of an export with ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, export_dir: str | os.PathLike, manifest: dict[str, Any] | None = None, *,
                 device: str = "cpu", threads: int | None = None, inter_threads: int | None = None,
                 level: str = "all", variant: str | None = None, batch_size: int | None = None,
                 spinning: bool | None = None):
        from vqdiff.normalise import Normalisation

        export_dir = Path(export_dir)
        manifest = manifest if manifest is not None else read_manifest(export_dir)
        cpu = not device.startswith("cuda")
        if batch_size is None:
            batch_size = ORT_CPU_BATCH if cpu else DEFAULT_BATCH
        super().__init__(normalisation=Normalisation.from_dict(manifest["normalisation"]),
                         model_info=model_info(manifest), manifest=manifest, batch_size=batch_size)
        enc_file, dec_file = _variant_files(manifest, variant)
        self.variant = variant or "fp32"
        self.device = device
        self.name = "ort-cuda" if device.startswith("cuda") else "ort-cpu"
        kw = dict(device=device, threads=threads, inter_threads=inter_threads, level=level, spinning=spinning)
        self.encoder = ort_session(export_dir / enc_file, **kw)
        self.decoder = ort_session(export_dir / dec_file, **kw)
        self.provider = self.encoder.get_providers()[0]
        self._enc_outputs = [o.name for o in self.encoder.get_outputs()]
        self.has_indices = "indices" in self._enc_outputs
        # only fetch what is returned: z stays inside the session
        self._fetch = ["latents", "indices"] if self.has_indices else ["latents"]
        self.threads = threads

    def _run_encoder(self, x):
        out = self.encoder.run(self._fetch, {ENC_INPUT: x})
        return out[0], (out[1] if self.has_indices else None)

    def _run_decoder(self, latents):
        return self.decoder.run(None, {DEC_INPUT: latents})[0]

    def encode_full(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every encoder output (``latents``, ``z``, ``indices``) of one batch."""
        x = self._check(x, 4, "groups (B, 3, 64, 64)")
        return dict(zip(self._enc_outputs, self.encoder.run(None, {ENC_INPUT: x}), strict=True))


def _variant_files(manifest: dict[str, Any], variant: str | None) -> tuple[str, str]:
    if variant in (None, "fp32"):
        return ENCODER, DECODER
    entry = manifest.get("variants", {}).get(variant)
    if not entry or not entry.get("kept"):
        kept = ["fp32"] + [k for k, v in manifest.get("variants", {}).items() if v.get("kept")]
        raise BackendUnavailable(f"this export has no kept variant {variant!r}; available: {kept}")
    return entry["encoder"], entry["decoder"]


# ----------------------------------------------------------------------------- torch
class TorchBackendEngine(_GroupEngine):
    """`vqdiff.engine.TorchEngine` with the normalisation and model info of its checkpoint."""

    backend = "torch"
    name = "torch"

    def __init__(self, checkpoint_dir: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 batch_size: int = DEFAULT_BATCH, expected_sha256: str | None = None,
                 manifest: dict | None = None):
        import torch

        from vqdiff.checkpoint import load_checkpoint
        from vqdiff.engine import TorchEngine

        ckpt = load_checkpoint(checkpoint_dir)
        if expected_sha256 and ckpt.model_hash != expected_sha256:
            raise BackendUnavailable(
                f"checkpoint {checkpoint_dir} has weights {ckpt.model_hash[:12]}, not the exported model's "
                f"{expected_sha256[:12]}; the torch backend needs the export's own source checkpoint"
            )
        if threads:
            torch.set_num_threads(int(threads))
        info = {"id": ckpt.model_id, "kind": ckpt.model.kind, "sha256": ckpt.model_hash}
        super().__init__(normalisation=ckpt.normalisation, model_info=info, manifest=manifest,
                         batch_size=batch_size)
        self.inner = TorchEngine(ckpt.model, device=device, batch_size=batch_size)
        self.provider = self.inner.provider
        from vqdiff.bottlenecks import uses_codebook

        self.has_indices = uses_codebook(ckpt.model.config.bottleneck)

    def _run_encoder(self, x):
        return self.inner.encode_with_indices(x)

    def _run_decoder(self, latents):
        return self.inner.decode_groups(latents)


# ----------------------------------------------------------------------------- selection
def _cuda_device(device: str | None) -> str | None:
    """The CUDA device to try for GPU backends, or None when the caller wants the CPU."""
    if device is None:
        return "cuda:0"
    d = str(device)
    if d == "cuda":
        return "cuda:0"
    if d.startswith("cuda:"):
        return d
    if d == "cpu":
        return None
    raise ValueError(f"unknown device {device!r}; accepted: None, 'cpu', 'cuda', 'cuda:N'")


_OPTIONS = {"ort": {"level", "variant", "inter_threads", "spinning"}, "tensorrt": {"precision"}, "torch": set()}


def _check_options(kwargs: dict) -> None:
    known = set().union(*_OPTIONS.values()) | {"batch_size"}
    unknown = set(kwargs) - known
    if unknown:
        raise ValueError(f"unknown engine option(s) {sorted(unknown)}; accepted: {sorted(known)}")


def _build(name: str, path: Path, manifest: dict | None, device: str | None, threads, kw) -> _GroupEngine:
    batch_size = kw.pop("batch_size", None)
    group = "ort" if name.startswith("ort") else name
    kw = {k: v for k, v in kw.items() if k in _OPTIONS[group]}  # options of the other backends do not apply
    if name == "torch":
        if manifest is None:
            ckpt_dir = path
        else:
            ckpt_dir = Path(manifest["source"]["checkpoint"])
            if not (ckpt_dir / "model.safetensors").is_file():
                raise BackendUnavailable(
                    f"the torch backend needs the source checkpoint {ckpt_dir}, which is not here; "
                    "pass that checkpoint directory instead of the export"
                )
        import torch

        if device is None:
            tdev = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            tdev = str(device)
            if tdev.startswith("cuda") and not torch.cuda.is_available():
                raise BackendUnavailable(f"torch has no CUDA device here (device={device!r})")
        return TorchBackendEngine(ckpt_dir, device=tdev, threads=threads, batch_size=batch_size or DEFAULT_BATCH,
                                  expected_sha256=manifest["model"]["sha256"] if manifest else None,
                                  manifest=manifest)
    if manifest is None:
        raise BackendUnavailable(
            f"{path} is a checkpoint directory: backend {name!r} needs an export directory "
            "(encoder.onnx, decoder.onnx, manifest.json); create one with `vqdiff-export CHECKPOINT OUT_DIR`"
        )
    if name == "ort-cpu":
        if device is not None and str(device) != "cpu":
            raise ValueError(f"backend 'ort-cpu' runs on the CPU; device {device!r} contradicts it")
        return OrtEngine(path, manifest, device="cpu", threads=threads, batch_size=batch_size, **kw)
    cuda = _cuda_device(device)
    if cuda is None:
        raise BackendUnavailable(f"backend {name!r} needs a CUDA device, but device={device!r}")
    if name == "ort-cuda":
        return OrtEngine(path, manifest, device=cuda, threads=threads, batch_size=batch_size, **kw)
    if name == "tensorrt":
        from .tensorrt import TensorRTEngine

        return TensorRTEngine(path, manifest, device=cuda, batch_size=batch_size or DEFAULT_BATCH, **kw)
    raise AssertionError(name)


def load_engine(path: str | os.PathLike, *, backend: str = "auto", device: str | None = None,
                threads: int | None = None, warmup: bool = True, **kwargs: Any) -> _GroupEngine:
    """Open the best (``backend="auto"``) or the named backend for an export or checkpoint directory.

    Parameters
    ----------
    path : export directory (``manifest.json``; its files are checked against their sha256) or
        checkpoint directory (``model.safetensors`` + ``config.json``; torch only).
    backend : ``"auto"`` (TensorRT -> ORT-CUDA -> ORT-CPU -> torch, first that works) or one of
        ``"tensorrt"``, ``"ort-cuda"``, ``"ort-cpu"``, ``"torch"``.
    device : None (GPU backends try ``cuda:0``), ``"cpu"`` (CPU backends only), ``"cuda[:N]"``.
    threads : intra-op threads (ONNX Runtime) / torch threads; None keeps the library default.
    warmup : run one group through encoder and decoder before returning.
    kwargs : backend options: ``batch_size`` (groups per run: any number of groups can be passed, the
        engine runs them in chunks of this size; default 8 for ONNX Runtime on the CPU, 256 otherwise);
        ONNX Runtime: ``level`` ("disable", "basic", "extended", "all"; default "all"), ``variant`` (e.g.
        "int8" if the export kept it), ``inter_threads``, ``spinning`` (default off on the CPU);
        TensorRT: ``precision`` ("fp32", "fp16"). Options of other backends are ignored.

    Raises
    ------
    ValueError : unknown backend name or contradictory device.
    BackendUnavailable : the named backend (or, for auto, every backend) cannot run here.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: 'auto', {', '.join(repr(b) for b in BACKENDS)}")
    _check_options(kwargs)
    path = Path(path)
    if not path.is_dir():
        raise BackendUnavailable(f"{path} is not a directory: expected an export or a checkpoint directory")
    manifest = read_manifest(path) if is_export_dir(path) else None
    if manifest is None and not (path / "model.safetensors").is_file():
        raise BackendUnavailable(
            f"{path} is neither an export directory (manifest.json) nor a checkpoint directory (model.safetensors)"
        )
    if backend != "auto":
        engine = _build(backend, path, manifest, device, threads, dict(kwargs))
    else:
        if device is not None and str(device) == "cpu":
            order = ("ort-cpu", "torch")
        elif device is not None and str(device).startswith("cuda"):
            order = ("tensorrt", "ort-cuda", "torch")
        else:
            order = BACKENDS
        if manifest is None:
            order = tuple(b for b in order if b == "torch")
        reasons = []
        engine = None
        for name in order:
            if name == "tensorrt" and not (manifest and manifest.get("tensorrt")):
                reasons.append("tensorrt: the export has no TensorRT engines")
                continue
            try:
                engine = _build(name, path, manifest, device, threads, dict(kwargs))
                break
            except (BackendUnavailable, ImportError, OSError, RuntimeError) as e:
                reasons.append(f"{name}: {e}")
                log.info("backend %s unavailable: %s", name, e)
        if engine is None:
            raise BackendUnavailable(f"no backend can run {path}: " + "; ".join(reasons))
        engine.fallback_reasons = reasons
    if warmup:
        engine.warmup()
    log.info("loaded %r", engine)
    return engine


def make_codec(path: str | os.PathLike, **kwargs: Any):
    """A `vqdiff.api.Codec` over ``load_engine(path, **kwargs)``."""
    from vqdiff.api import Codec

    engine = load_engine(path, **kwargs)
    return Codec(engine, engine.normalisation, engine.model_info)
