"""The torch backend: the checkpoint's own model, behind the same engine interface as the exports.

Imported only when the torch backend is asked for (`vqdiff.export.runtime` stays torch-free).
"""

from __future__ import annotations

import os
from pathlib import Path

from .engine_base import DEFAULT_BATCH, BackendUnavailable, _GroupEngine


class TorchBackendEngine(_GroupEngine):
    """`vqdiff.torch_engine.TorchEngine` with the normalisation and model info of its checkpoint."""

    backend = "torch"
    name = "torch"

    def __init__(self, checkpoint_dir: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 batch_size: int = DEFAULT_BATCH, expected_sha256: str | None = None,
                 manifest: dict | None = None):
        import torch

        from vqdiff.bottlenecks import uses_codebook
        from vqdiff.checkpoint import load_checkpoint
        from vqdiff.torch_engine import TorchEngine

        ckpt = load_checkpoint(checkpoint_dir)
        if expected_sha256 and ckpt.model_hash != expected_sha256:
            raise BackendUnavailable(
                f"checkpoint {checkpoint_dir} has weights {ckpt.model_hash[:12]}, not the exported model's "
                f"{expected_sha256[:12]}; the torch backend needs the export's own source checkpoint"
            )
        if threads:
            torch.set_num_threads(int(threads))
        info = ckpt.model_info
        super().__init__(normalisation=ckpt.normalisation, model_info=info, manifest=manifest,
                         batch_size=batch_size)
        self.inner = TorchEngine(ckpt.model, device=device, batch_size=batch_size)
        self.provider = self.inner.provider
        self.has_indices = uses_codebook(ckpt.model.config.bottleneck)

    def _run_encoder(self, x):
        return self.inner.encode_with_indices(x)

    def _run_decoder(self, latents):
        return self.inner.decode_groups(latents)


def open_torch_engine(path: Path, manifest: dict | None, device: str | None, threads: int | None,
                      batch_size: int | None) -> TorchBackendEngine:
    """The torch engine of a checkpoint directory, or of an export's source checkpoint (checked by sha256).

    ``device`` None picks CUDA when torch sees a GPU, else the CPU.
    """
    import torch

    if manifest is None:
        ckpt_dir = Path(path)
    else:
        ckpt_dir = Path(manifest["source"]["checkpoint"])
        if not (ckpt_dir / "model.safetensors").is_file():
            raise BackendUnavailable(
                f"the torch backend needs the source checkpoint {ckpt_dir}, which is not here; "
                "pass that checkpoint directory instead of the export"
            )
    if device is None:
        tdev = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        tdev = str(device)
        if tdev.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"torch has no CUDA device here (device={device!r})")
    return TorchBackendEngine(ckpt_dir, device=tdev, threads=threads, batch_size=batch_size or DEFAULT_BATCH,
                              expected_sha256=manifest["model"]["sha256"] if manifest else None,
                              manifest=manifest)
