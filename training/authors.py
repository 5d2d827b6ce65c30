"""Import the VQ-Diff authors' released weights as normal vqdiff checkpoints.

The authors (github drewrl3v/diff-vq-vae, commit 0b616d2, MIT licence) released plain PyTorch
``state_dict``s of their ``AllModels`` class for AE, VQ-VAE, VQ-VAE-EMA and VQ-Diff, trained on all
TractoInferno training subjects. Their layers map one-to-one onto `vqdiff.models` (same
architecture: hidden 128, residual hidden 32, 2 residual layers, embedding 64, 512 codes); this
module maps them by name *and* shape and refuses anything that does not fit. Files are read with
``torch.load(..., weights_only=True)`` only: nothing is unpickled.

Their input space is the coordinates of ``subject01`` divided by 100 (centre 0, scale 100 in
subject01's units), so the imported checkpoint carries that normalisation. Registration templates
are built from a folder of bundles in that space (subject01; a validation subject of the authors, so
not their training data).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from vqdiff.errors import VQDiffError

log = logging.getLogger(__name__)

SOURCE_REPO = "https://github.com/drewrl3v/diff-vq-vae"
SOURCE_COMMIT = "0b616d2"
LICENCE = """MIT License

Copyright (c) 2023 Andrew Lizarraga

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
LICENCE_FILE = "LICENSE-authors.txt"
KINDS = ("ae", "vq", "vq_ema", "vq_diff")
# sha256 of the released files (run_experiments/saved_models/<kind>.pt at commit 0b616d2).
KNOWN_FILES = {
    "21f6938dc8c344cbb5d2f4b44afb4e90722ea679d8cd893675c1a32bf91d7c2c": "ae",
    "fd8bb5098cb91c91eb92336702ed71843285dc8fa2523fc6512c3f50311005f3": "vq",
    "220bc894825c2416cf45297dc6006dee52db4770877067bd96a099ecd9f11c18": "vq_diff",
    "83537dae7efe756b7fb0c4958f99cc4f12cb04b51e574320daa129a82869205b": "vq_ema",
}
# The authors' training settings for the bottlenecks (their train.py): tau 10, std 2, decay 0.99.
BOTTLENECK = {"ae": {}, "vq": {"num_codes": 512, "commitment_cost": 0.25},
              "vq_ema": {"num_codes": 512, "commitment_cost": 0.25, "decay": 0.99},
              "vq_diff": {"num_codes": 512, "tau": 10.0, "init_std": 2.0}}
AUTHORS_SCALE = 100.0  # their [-1, 1] space = subject01 units / 100

_ENC = {"_conv_1": "encoder.net.0", "_conv_2": "encoder.net.2", "_conv_3": "encoder.net.4"}
_DEC = {"_conv_1": "decoder.net.0", "_conv_trans_1": "decoder.net.2", "_conv_trans_2": "decoder.net.4"}
_VQ = {"_embedding.weight": "bottleneck.codebook", "_ema_w": "bottleneck.ema_weight",
       "_ema_cluster_size": "bottleneck.ema_cluster_size"}


class AuthorsWeightsError(VQDiffError, ValueError):
    """The file is not one of the authors' state_dicts of the requested kind."""


def map_name(name: str) -> str:
    """The authors' parameter name -> ours (ValueError for a name that has no counterpart)."""
    m = re.fullmatch(r"_(encoder|decoder)\.(_conv_1|_conv_2|_conv_3|_conv_trans_1|_conv_trans_2)\.(weight|bias)", name)
    if m:
        part, layer, p = m.groups()
        table = _ENC if part == "encoder" else _DEC
        if layer in table:
            return f"{table[layer]}.{p}"
    m = re.fullmatch(r"_(encoder|decoder)\._residual_stack\._layers\.(\d+)\._block\.([13])\.weight", name)
    if m:
        part, i, j = m.groups()
        return f"{part}.net.{5 if part == 'encoder' else 1}.layers.{i}.block.{j}.weight"
    m = re.fullmatch(r"_pre_vq_conv\.(weight|bias)", name)
    if m:
        return f"encoder.net.6.{m.group(1)}"
    m = re.fullmatch(r"_vq_vae\.(.+)", name)
    if m and m.group(1) in _VQ:
        return _VQ[m.group(1)]
    raise AuthorsWeightsError(f"authors' tensor {name!r} has no counterpart in vqdiff's architecture")


def load_authors_state(path: str | Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable or unsafe file: one clear error
        raise AuthorsWeightsError(f"{path}: not a weights-only PyTorch state_dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AuthorsWeightsError(f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
    return state


def guess_kind(state: dict) -> str | None:
    """The kind a state_dict's keys imply (None when vq and vq_diff cannot be told apart by keys)."""
    if "_vq_vae._ema_w" in state:
        return "vq_ema"
    if "_vq_vae._embedding.weight" not in state:
        return "ae"
    return None


def convert(state: dict, kind: str):
    """Our `StreamlineAutoencoder` with the authors' weights; every tensor mapped by name and shape."""
    import torch

    from vqdiff.models import ModelConfig, StreamlineAutoencoder

    if kind not in KINDS:
        raise AuthorsWeightsError(f"unknown kind {kind!r}; the authors released {list(KINDS)}")
    implied = guess_kind(state)
    if implied is not None and implied != kind:
        raise AuthorsWeightsError(f"the file's layers are those of {implied!r}, not {kind!r}")
    if implied is None and kind not in ("vq", "vq_diff"):
        raise AuthorsWeightsError(f"the file's layers are those of 'vq' or 'vq_diff', not {kind!r}")
    # Their residual block starts with nn.ReLU(inplace=True), which rectifies the skip input too:
    # the block computes relu(x) + block(x). Without this the released reconstructions are not reproduced.
    model = StreamlineAutoencoder.from_config(
        ModelConfig.for_kind(kind, bottleneck=BOTTLENECK[kind], residual_skip="relu"))
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        target = map_name(name)
        if target not in ours:
            raise AuthorsWeightsError(f"authors' tensor {name!r} -> {target!r}: no such tensor in a {kind!r} model")
        if tuple(ours[target].shape) != tuple(t.shape):
            raise AuthorsWeightsError(f"authors' tensor {name!r} has shape {tuple(t.shape)}; {target!r} needs "
                               f"{tuple(ours[target].shape)}")
        if target in mapped:
            raise AuthorsWeightsError(f"two authors' tensors map onto {target!r}")
        mapped[target] = t.detach().to(ours[target].dtype).clone()
    params = {n for n, _ in model.named_parameters()}
    missing = sorted(set(ours) - set(mapped))
    if any(n in params for n in missing):
        raise AuthorsWeightsError(f"the file lacks weights for {[n for n in missing if n in params]}")
    if missing:  # bottleneck state the authors' code does not keep (the EMA step counter): the module's
        # loader fills it from the statistics it is given (trained EMA statistics -> a warmed counter)
        log.info("%s not in the authors' file: filled by the model's loader", missing)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        raise AuthorsWeightsError(f"the authors' weights do not fill a {kind!r} model: {e}") from e
    if kind == "vq_ema":
        _align_ema(model, state)
    return model.eval()


def _align_ema(model, state: dict) -> None:
    """The authors' EMA statistics are already Laplace-smoothed and their codebook is
    ``ema_w / cluster_size``; keep their codebook as trained (it is what they evaluated)."""
    import torch

    with torch.no_grad():
        model.bottleneck.codebook.copy_(state["_vq_vae._embedding.weight"])


def authors_normalisation(templates_points: np.ndarray | None):
    """Centre 0, scale 100 (the authors' space); the data range of the templates when known."""
    from vqdiff.normalise import Normalisation

    if templates_points is None or len(templates_points) == 0:
        lo, hi = (-AUTHORS_SCALE,) * 3, (AUTHORS_SCALE,) * 3
    else:
        lo, hi = tuple(map(float, templates_points.min(0))), tuple(map(float, templates_points.max(0)))
    return Normalisation((0.0, 0.0, 0.0), AUTHORS_SCALE, lo, hi)


def default_templates_dir(weights: Path) -> Path | None:
    """Where subject01 lies next to the authors' weights (``../shared/authors`` -> ``../shared/data``)."""
    import os

    candidates = []
    if os.environ.get("VQDIFF_SHARED_DATA"):
        candidates.append(Path(os.environ["VQDIFF_SHARED_DATA"]) / "subject01")
    candidates.append(weights.resolve().parent.parent / "data" / "subject01")
    return next((c for c in candidates if c.is_dir()), None)


def import_authors(weights: str | Path, out_dir: str | Path, *, kind: str | None = None,
                   templates_dir: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``out_dir`` (checkpoint + MODEL_CARD.md + templates + licence); return a summary."""
    from vqdiff.checkpoint import file_sha256, save_checkpoint
    from vqdiff.codec import TEMPLATES_FILE
    from vqdiff.templates import Templates

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (the authors' files are ae.pt, vq.pt, vq_ema.pt, vq_diff.pt)")
    sha = file_sha256(weights)
    known = KNOWN_FILES.get(sha)
    if kind is None:
        if known is None:
            raise AuthorsWeightsError(f"{weights} is not one of the released files (sha256 {sha[:12]}...); pass --kind")
        kind = known
    if known is not None and known != kind:
        raise AuthorsWeightsError(f"{weights} is the authors' {known!r} file (sha256 {sha[:12]}...), not {kind!r}")
    model = convert(load_authors_state(weights), kind)
    files = {LICENCE_FILE: LICENCE.encode()}
    tdir = Path(templates_dir) if templates_dir else default_templates_dir(weights)
    points, template_names = None, []
    if tdir is not None:
        bundles = Templates.folder_bundles(tdir)  # read once: templates and normalisation
        templates = Templates.from_bundles(bundles)
        files[TEMPLATES_FILE] = templates.to_bytes()
        template_names = templates.names
        points = np.concatenate([np.concatenate(s) for s in bundles.values()]) if bundles else None
    else:
        log.warning("no templates folder (subject01) found: the imported model cannot register inputs; "
                    "pass --templates DIR")
    norm = authors_normalisation(points)
    provenance = {"source_repo": SOURCE_REPO, "source_commit": SOURCE_COMMIT,
                  "source_path": f"run_experiments/saved_models/{kind}.pt", "file": weights.name,
                  "file_sha256": sha, "known_release": known is not None,
                  "licence": "MIT (c) 2023 Andrew Lizarraga", "licence_file": LICENCE_FILE,
                  "trained_on": "TractoInferno training subjects (the authors; batch 256, 15,000-30,000 "
                                "iterations on a GPU)",
                  "input_space": "subject01 coordinates / 100 (centre 0, scale 100)",
                  "templates_from": str(tdir) if tdir else None}
    model_id = f"authors-{kind}"
    extra = {"provenance": provenance, "bundles": template_names,
             "training": {"kind": kind, "imported": True, "by": "vqdiff-import-authors"}}
    out = save_checkpoint(out_dir, model, norm, model_id=model_id, extra=extra, files=files, overwrite=overwrite)
    weights_sha = file_sha256(out / "model.safetensors")
    (out / "MODEL_CARD.md").write_text(model_card(model_id, kind, provenance, weights_sha, template_names))
    return {"checkpoint": str(out), "model_id": model_id, "kind": kind, "source_sha256": sha,
            "weights_sha256": weights_sha, "templates": template_names}


def model_card(model_id: str, kind: str, provenance: dict, weights_sha: str, templates: list[str]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in provenance.items())
    return (
        f"# Model card: {model_id}\n\n"
        f"The VQ-Diff authors' released **{kind}** weights, converted to a vqdiff checkpoint by "
        f"`vqdiff-import-authors` (layers mapped one-to-one by name and shape; loaded with "
        f"`weights_only=True`). Not trained by us.\n\n"
        f"| | |\n|---|---|\n{rows}\n| weights sha256 (converted) | `{weights_sha}` |\n"
        f"| registration templates | {', '.join(templates) or 'none'} |\n\n"
        "Inference is deterministic (VQ-Diff: softmax(-d/tau) without Gumbel noise); the authors "
        "sampled Gumbel noise at evaluation too. subject01 is one of the authors' validation subjects, so "
        "figures on it are on data these weights never trained on. Quality figures: `docs/table1.md` "
        "(within-subject, subject01) and `docs/cross_subject.md` (other subjects).\n\n"
        f"Licence: MIT, Copyright (c) 2023 Andrew Lizarraga; the full text is in `{LICENCE_FILE}` and must "
        "stay with these weights and anything converted from them.\n"
    )

