"""The importer of the VQ-Diff authors' released weights (../shared/authors)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_data_dir

AUTHORS = shared_data_dir().parent / "authors"
needs_authors = pytest.mark.skipif(
    not (AUTHORS / "vq_diff.pt").is_file(),
    reason=f"the authors' weights are not at {AUTHORS} (set VQDIFF_SHARED_DATA to ../shared/data)")


def _state(kind):
    return torch.load(AUTHORS / f"{kind}.pt", map_location="cpu", weights_only=True)


def _res_stack(sd: dict, h: torch.Tensor, prefix: str) -> torch.Tensor:
    for i in range(2):
        b = f"{prefix}._residual_stack._layers.{i}._block"
        # the authors' block starts with an in-place ReLU, which also rectifies the skip input
        h = F.relu(h) + F.conv2d(F.relu(F.conv2d(F.relu(h), sd[f"{b}.1.weight"], padding=1)), sd[f"{b}.3.weight"])
    return F.relu(h)


def _authors_encoder(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The authors' encoder (+ pre-VQ conv) written out from their tensors with torch.nn.functional."""
    res_stack = partial(_res_stack, sd)
    e = "_encoder"
    h = F.relu(F.conv2d(x, sd[f"{e}._conv_1.weight"], sd[f"{e}._conv_1.bias"], stride=2, padding=1))
    h = F.relu(F.conv2d(h, sd[f"{e}._conv_2.weight"], sd[f"{e}._conv_2.bias"], stride=2, padding=1))
    h = res_stack(F.conv2d(h, sd[f"{e}._conv_3.weight"], sd[f"{e}._conv_3.bias"], padding=1), e)
    return F.conv2d(h, sd["_pre_vq_conv.weight"], sd["_pre_vq_conv.bias"])


def _authors_decoder(sd: dict, z: torch.Tensor) -> torch.Tensor:
    res_stack = partial(_res_stack, sd)
    d = "_decoder"
    h = res_stack(F.conv2d(z, sd[f"{d}._conv_1.weight"], sd[f"{d}._conv_1.bias"], padding=1), d)
    h = F.relu(F.conv_transpose2d(h, sd[f"{d}._conv_trans_1.weight"], sd[f"{d}._conv_trans_1.bias"], stride=2,
                                  padding=1))
    return F.conv_transpose2d(h, sd[f"{d}._conv_trans_2.weight"], sd[f"{d}._conv_trans_2.bias"], stride=2,
                                 padding=1)


@needs_authors
@pytest.mark.parametrize("kind", ["ae", "vq", "vq_ema", "vq_diff"])
def test_every_release_converts_and_computes_what_the_authors_layers_compute(kind):
    from vqdiff.training.authors import convert

    sd = _state(kind)
    model = convert(sd, kind)
    x = torch.randn(2, 3, 64, 64) * 0.5
    z_ref = _authors_encoder(sd, x)
    with torch.no_grad():
        z = model.encoder(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.decoder(z), _authors_decoder(sd, z_ref), rtol=1e-4, atol=1e-5)
        if kind == "ae":  # identity bottleneck: the whole model is the authors' network
            torch.testing.assert_close(model(x).reconstruction, _authors_decoder(sd, z_ref), rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(model.bottleneck.codebook, sd["_vq_vae._embedding.weight"])


@needs_authors
def test_vq_diff_latents_are_the_authors_soft_assignment_without_noise():
    from vqdiff.training.authors import convert

    sd = _state("vq_diff")
    model = convert(sd, "vq_diff")
    x = torch.randn(1, 3, 64, 64) * 0.5
    z = _authors_encoder(sd, x)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 64)
    e = sd["_vq_vae._embedding.weight"]
    d = (flat ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * flat @ e.t()
    soft = torch.softmax(-d / 10.0, dim=-1) @ e  # tau = 10, no Gumbel noise
    with torch.no_grad():
        lat = model.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, 64)
    torch.testing.assert_close(lat, soft, rtol=1e-4, atol=1e-4)


@needs_authors
def test_mismatches_are_refused():
    from vqdiff.training.authors import AuthorsWeightsError, convert, import_authors

    with pytest.raises(AuthorsWeightsError, match="'ae'"):
        convert(_state("ae"), "vq_diff")
    with pytest.raises(AuthorsWeightsError, match="vq_ema"):
        convert(_state("vq_ema"), "vq")
    bad = dict(_state("vq_diff"))
    bad["_encoder._conv_1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(AuthorsWeightsError, match="shape"):
        convert(bad, "vq_diff")
    extra = dict(_state("ae"))
    extra["_encoder._conv_9.weight"] = torch.zeros(1)
    with pytest.raises(AuthorsWeightsError, match="no counterpart"):
        convert(extra, "ae")
    short = dict(_state("ae"))
    del short["_decoder._conv_1.bias"]
    with pytest.raises(AuthorsWeightsError, match="lacks"):
        convert(short, "ae")
    # a released file is known by its sha256: vq.pt cannot be imported as vq_diff (same layer names)
    with pytest.raises(AuthorsWeightsError, match="'vq'"):
        import_authors(AUTHORS / "vq.pt", "/nonexistent/never-written", kind="vq_diff")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickles_are_never_unpickled(tmp_path):
    from vqdiff.training.authors import AuthorsWeightsError, load_authors_state

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(AuthorsWeightsError, match="weights-only"):
        load_authors_state(p)
    torch.save({"w": torch.zeros(1), "x": [1, 2]}, tmp_path / "notdict.pt")
    with pytest.raises(AuthorsWeightsError, match="state_dict"):
        load_authors_state(tmp_path / "notdict.pt")


@needs_authors
def test_cli_writes_a_checkpoint_with_card_licence_and_templates(tmp_path, subject_dir):
    from vqdiff.checkpoint import load_checkpoint
    from vqdiff.codec import Codec
    from vqdiff.io import load_bundle
    from vqdiff.quality import reconstruction_quality

    out = tmp_path / "authors-vq_diff"
    r = subprocess.run([sys.executable, "-m", "vqdiff.training.cli_import_authors", str(AUTHORS / "vq_diff.pt"),
                        str(out), "--kind", "vq_diff", "--templates", str(subject_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["kind"] == "vq_diff" and summary["source_sha256"].startswith("220bc894")
    ck = load_checkpoint(out)
    assert ck.normalisation.center == (0.0, 0.0, 0.0) and ck.normalisation.scale == 100.0
    assert ck.info["provenance"]["source_commit"] == "0b616d2"
    assert "MIT" in (out / "LICENSE-authors.txt").read_text()
    card = (out / "MODEL_CARD.md").read_text()
    assert "Andrew Lizarraga" in card and summary["source_sha256"] in card
    codec = Codec.from_checkpoint(out)
    assert codec.pipeline.templates is not None and "MCP" in codec.pipeline.templates
    # subject01 is unseen data for these weights; the import must reconstruct it (not a random net)
    bundle = load_bundle(subject_dir / "PYT_R.trk")
    q = reconstruction_quality(bundle, codec.decode(codec.encode(bundle, register="off")))
    assert q["mean_mdf_mm"] < 2.5, q
    # a second import over it needs -f; a file that is not a state_dict is a clear error, exit 2
    assert subprocess.run([sys.executable, "-m", "vqdiff.training.cli_import_authors",
                           str(AUTHORS / "vq_diff.pt"), str(out)], capture_output=True).returncode == 2
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    r = subprocess.run([sys.executable, "-m", "vqdiff.training.cli_import_authors", str(tmp_path / "x.pt"),
                        str(tmp_path / "o"), "--kind", "ae"], capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


@needs_authors
def test_paper_protocol_groupings(subject_dir):
    from vqdiff.io import load_bundle
    from vqdiff.training.paper_protocol import canonical_groups, file_order_groups

    s = load_bundle(subject_dir / "PYT_R.trk").streamlines
    f, c = file_order_groups(s), canonical_groups(s)
    assert f.shape == (len(s) // 64, 64, 64, 3)
    assert c.shape == (-(-len(s) // 64), 64, 64, 3)
    np.testing.assert_allclose(f[0, 0, 0], s[0][0], atol=1e-4)  # file order, not re-oriented



RELEASE = Path(__file__).parent / "data" / "authors_release_MCP_group0.npz"  # see tests/data/README.md


@needs_authors
@pytest.mark.parametrize("kind", ["ae", "vq"])
def test_imported_deterministic_models_reproduce_the_released_reconstructions(kind, subject_dir):
    """The authors' own reconstructions of subject01 MCP (run_experiments/subject_recons) come back."""
    from vqdiff.geometry import groups_to_model
    from vqdiff.io import load_bundle
    from vqdiff.training.authors import convert
    from vqdiff.training.paper_protocol import file_order_groups

    rel = np.load(RELEASE, allow_pickle=False)
    # their input: the first file-order group of subject01's MCP in their space (subject01 units / 100)
    first = file_order_groups(load_bundle(subject_dir / "MCP.trk").streamlines)[:1] / 100.0
    x = torch.from_numpy(groups_to_model(first.astype(np.float32)))
    ref = rel[f"recon_{kind}"].reshape(-1, 64, 3, 64).transpose(0, 2, 1, 3)
    with torch.no_grad():
        rec = convert(_state(kind), kind)(x).reconstruction.numpy()
    diff = np.abs(rec - ref)
    assert diff.mean() < 3e-4  # with x + block(x) instead of the authors' relu(x) + block(x): 1.4e-3
    assert np.mean(diff < 1e-3) > 0.97  # VQ: a few positions pick a neighbouring code (GPU vs CPU rounding)
