"""The torch backend: the checkpoint's own model, behind the same engine interface as the exports.

On the CPU: `vqdiff.torch_engine.TorchEngine` (fp32, or bf16 autocast + channels_last). On a CUDA
device with ``graphs`` (the default there): `vqdiff.export.torch_cuda.CudaGraphEngine` (autocast,
channels_last, CUDA graphs per batch bucket, pinned buffers, copies overlapped with compute).
Imported only when the torch backend is asked for (`vqdiff.export.runtime` stays torch-free).
"""

from __future__ import annotations

import os
from pathlib import Path

from .engine_base import DEFAULT_BATCH, BackendUnavailable, _GroupEngine, load_checked


class TorchBackendEngine(_GroupEngine):
    """`vqdiff.torch_engine.TorchEngine` with the normalisation and model info of its checkpoint."""

    backend = "torch"
    name = "torch"

    def __init__(self, checkpoint_dir: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 batch_size: int = DEFAULT_BATCH, expected_sha256: str | None = None,
                 manifest: dict | None = None, precision: str = "fp32", channels_last: bool | None = None,
                 layers: str = "all"):
        import torch

        from vqdiff.bottlenecks import uses_codebook
        from vqdiff.torch_engine import TorchEngine

        ckpt = load_checked(checkpoint_dir, expected_sha256, precision)
        if threads:
            torch.set_num_threads(int(threads))
        info = ckpt.model_info
        super().__init__(normalisation=ckpt.normalisation, model_info=info, manifest=manifest,
                         batch_size=batch_size)
        if channels_last is None:
            channels_last = precision != "fp32"  # measured: NHWC is what makes bf16 pay on oneDNN
        self.inner = TorchEngine(ckpt.model, device=device, batch_size=batch_size, precision=precision,
                                 channels_last=channels_last, layers=layers)
        self.provider = self.inner.provider
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.has_indices = uses_codebook(ckpt.model.config.bottleneck)

    def _run_encoder(self, x):
        return self.inner.encode_with_indices(x)

    def _run_decoder(self, latents):
        return self.inner.decode_groups(latents)


def open_torch_engine(path: Path, manifest: dict | None, device: str | None, threads: int | None,
                      batch_size: int | None, *, precision: str = "fp32", channels_last: bool | None = None,
                      graphs: bool | None = None, buckets=None, layers: str = "all") -> _GroupEngine:
    """The torch engine of a checkpoint directory, or of an export's source checkpoint (checked by sha256).

    ``device`` None picks CUDA when torch sees a GPU, else the CPU. On CUDA, ``graphs`` (default True)
    opens the CUDA graph engine with ``buckets`` (default `engine_base.DEFAULT_BUCKETS`).
    """
    import torch

    ckpt_dir = source_checkpoint(path, manifest)
    if device is None:
        tdev = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        tdev = str(device)
        if tdev.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"torch has no CUDA device here (device={device!r})")
    expected = manifest["model"]["sha256"] if manifest else None
    if tdev.startswith("cuda") and graphs is not False:
        from .torch_cuda import CudaGraphEngine

        return CudaGraphEngine(ckpt_dir, device=tdev, precision=precision, buckets=buckets,
                               channels_last=True if channels_last is None else channels_last,
                               expected_sha256=expected, manifest=manifest, layers=layers)
    return TorchBackendEngine(ckpt_dir, device=tdev, threads=threads, batch_size=batch_size or DEFAULT_BATCH,
                              expected_sha256=expected, manifest=manifest, precision=precision,
                              channels_last=channels_last, layers=layers)


def source_checkpoint(path: Path, manifest: dict | None) -> Path:
    """The checkpoint directory behind ``path`` (itself, or the export's recorded source)."""
    if manifest is None:
        return Path(path)
    ckpt_dir = Path(manifest["source"]["checkpoint"])
    if not (ckpt_dir / "model.safetensors").is_file():
        raise BackendUnavailable(
            f"the torch backend needs the source checkpoint {ckpt_dir}, which is not here; "
            "pass that checkpoint directory instead of the export"
        )
    return ckpt_dir
