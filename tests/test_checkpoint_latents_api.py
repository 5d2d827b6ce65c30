import json

import nibabel as nib
import numpy as np
import pytest
import torch

from vqdiff.api import Codec, decode, default_model_dir, encode
from vqdiff.bottlenecks import KINDS
from vqdiff.bundle import Bundle, SpatialHeader
from vqdiff.checkpoint import load_checkpoint, save_checkpoint
from vqdiff.errors import CheckpointError, LatentsFormatError, ModelMismatchError
from vqdiff.latents import Latents
from vqdiff.models import ModelConfig, StreamlineAutoencoder
from vqdiff.normalise import Normalisation

TINY = dict(hidden=16, residual_hidden=8, embedding_dim=8)


def _model(kind="vq_diff", **kw):
    b = {"num_codes": 16} if kind not in ("ae", "vae") else {}
    return StreamlineAutoencoder.from_config(ModelConfig.for_kind(kind, bottleneck=b, **{**TINY, **kw}))


@pytest.fixture
def norm():
    return Normalisation.fit(np.array([[-100.0, -100, -100], [100, 100, 100]]))


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_rebuilds_model_alone(tmp_path, kind, norm):
    model = _model(kind).train()
    model(torch.randn(2, 3, 64, 64))  # moves EMA buffers for vq_ema
    model.eval()
    save_checkpoint(tmp_path / "ck", model, norm, extra={"metrics": {"buan": 0.5}})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.model.config == model.config and ck.normalisation == norm
    assert ck.info["metrics"] == {"buan": 0.5} and len(ck.model_hash) == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ck.model(x).reconstruction, model(x).reconstruction)


def test_checkpoint_has_no_pickle(tmp_path, norm):
    save_checkpoint(tmp_path / "ck", _model(), norm)
    raw = (tmp_path / "ck" / "model.safetensors").read_bytes()
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:4]
    json.loads((tmp_path / "ck" / "config.json").read_text())


def test_checkpoint_errors(tmp_path, norm):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "missing")
    save_checkpoint(tmp_path / "ck", _model(), norm)
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path / "ck", _model(), norm)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not supported"):
        load_checkpoint(tmp_path / "ck")
    save_checkpoint(tmp_path / "ck2", _model(), norm)
    (tmp_path / "ck2" / "model.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "ck2")
    save_checkpoint(tmp_path / "ck3", _model(hidden=32), norm)
    (tmp_path / "ck3" / "config.json").write_text((tmp_path / "ck" / "config.json").read_text().replace("99", "1"))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "ck3")


@pytest.fixture
def codec(tmp_path, norm):
    save_checkpoint(tmp_path / "model", _model(), norm, model_id="tiny")
    return Codec.from_checkpoint(tmp_path / "model")


def _random_bundle(n=100, seed=0):
    rng = np.random.default_rng(seed)
    s = [np.cumsum(rng.normal(size=(int(rng.integers(10, 90)), 3)), 0).astype(np.float32) for _ in range(n)]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-90, -126, -72]
    return Bundle(s, SpatialHeader(affine, (91, 109, 91), (2.0, 2.0, 2.0), "LAS"), "trk", "synthetic")


def test_latents_file_round_trip(tmp_path, codec):
    lat = codec.encode(_random_bundle())
    assert lat.latents.shape == (2, 8, 16, 16) and lat.indices.shape == (2, 16, 16)
    assert lat.model == {"id": "tiny", "kind": "vq_diff", "sha256": codec.model_hash}
    lat.save(tmp_path / "x.vqlat")
    again = Latents.load(tmp_path / "x.vqlat")
    np.testing.assert_array_equal(again.latents, lat.latents)
    np.testing.assert_array_equal(again.order, lat.order)
    np.testing.assert_array_equal(again.flipped, lat.flipped)
    np.testing.assert_array_equal(again.n_points, lat.n_points)
    np.testing.assert_array_equal(again.indices, lat.indices)
    assert again.header.to_dict() == lat.header.to_dict()
    assert again.normalisation == lat.normalisation and again.source == {"format": "trk", "name": "synthetic"}
    with pytest.raises(FileExistsError):
        lat.save(tmp_path / "x.vqlat")


def test_latents_refuses_foreign_or_future_files(tmp_path, codec):
    with pytest.raises(LatentsFormatError, match="vqdiff-latents"):
        Latents.from_bytes(b"TRACK" + b"\0" * 100)
    with pytest.raises(LatentsFormatError):
        Latents.from_bytes(b"")
    from safetensors.numpy import save

    with pytest.raises(LatentsFormatError, match="format tag"):
        Latents.from_bytes(save({"a": np.zeros(2, np.float32)}))
    data = codec.encode(_random_bundle()).to_bytes()
    future = data.replace(b'"format_version":"2"', b'"format_version":"7"')
    assert future != data
    with pytest.raises(LatentsFormatError, match="not supported"):
        Latents.from_bytes(future)


def _safetensors_sorted(tensors, metadata) -> bytes:
    """The reference: safetensors' own writer, its metadata map then sorted by key."""
    from safetensors.numpy import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


@pytest.mark.parametrize("with_indices", [True, False])
def test_latents_bytes_are_safetensors_own_with_sorted_metadata(codec, with_indices):
    """`to_parts` writes the tensors' memory without copying it: the bytes must be exactly those of
    safetensors' writer (its layout: dtype then name order, 8-byte padding), metadata sorted."""
    import dataclasses

    from safetensors.numpy import load

    from vqdiff.fileio import safetensors_parts

    lat = codec.encode(_random_bundle(n=130))
    if not with_indices:
        lat = dataclasses.replace(lat, indices=None)
    data = lat.to_bytes()
    assert data == _safetensors_sorted(lat._tensors(), lat._metadata())
    assert data == b"".join(bytes(p) for p in lat.to_parts())
    back = load(data)
    assert set(back) == set(lat._tensors()) and all(np.array_equal(back[k], v) for k, v in lat._tensors().items())
    odd = {"z": np.arange(5, dtype=np.int16), "a": np.ones((2, 3), np.float16), "e": np.zeros(0, np.float32),
           "b": np.array([True, False]), "u": np.arange(3, dtype=np.uint32)}
    assert b"".join(safetensors_parts(odd, {"k": "v"})) == _safetensors_sorted(odd, {"k": "v"})
    with pytest.raises(ValueError, match="C-contiguous little-endian"):
        safetensors_parts({"t": np.zeros((4, 4))[:, ::2]}, {})


def test_inconsistent_latents_are_refused_up_front(codec):
    """Checked where the file enters: slots per group, point counts (no int64 overflow), the model hash."""
    import dataclasses

    lat = codec.encode(_random_bundle())  # 2 groups, 100 streamlines

    def refused(match, **change):
        bad = dataclasses.replace(lat, **change)
        with pytest.raises(LatentsFormatError, match=match):
            bad.to_bytes()
        with pytest.raises(LatentsFormatError, match=match):
            Latents._from_parts(bad._tensors(), bad._metadata())

    refused("order has 64 slots", order=lat.order[:64], pad_mask=lat.pad_mask[:64])  # G x 32
    refused("n_points must lie in", n_points=np.full_like(lat.n_points, 2**62))
    refused("n_points must lie in", n_points=np.ones_like(lat.n_points))
    refused("model's weights hash", model={"id": "tiny", "kind": "vq_diff"})
    refused("order points outside", order=np.where(lat.pad_mask, lat.order, 10**6))
    assert lat.total_points == sum(len(s) for s in _random_bundle().streamlines)


def test_version_1_latents_still_read_as_identity(codec):
    from safetensors.numpy import save

    lat = codec.encode(_random_bundle())
    tensors = {k: v for k, v in lat._tensors().items() if k != "transform"}
    meta = {k: v for k, v in lat._metadata().items() if k != "registration"} | {"format_version": "1"}
    old = Latents.from_bytes(save(tensors, metadata=meta))
    assert old.format_version == 1 and old.transform is None and old.registration == {}
    np.testing.assert_array_equal(old.matrix, np.eye(4))
    np.testing.assert_array_equal(codec.decode(old).streamlines, codec.decode(lat).streamlines)
    assert Latents.from_bytes(lat.to_bytes()).format_version == 2


def test_decode_restores_order_direction_space(codec):
    bundle = _random_bundle(n=130)
    out = codec.decode(codec.encode(bundle), restore_points=True)
    assert len(out.streamlines) == 130
    assert [len(s) for s in out.streamlines] == [len(s) for s in bundle.streamlines]
    assert np.array_equal(out.header.affine, bundle.header.affine) and out.header.voxel_order == "LAS"


def test_decode_refuses_other_models_latents(tmp_path, codec, norm):
    lat = codec.encode(_random_bundle())
    save_checkpoint(tmp_path / "other", _model(), norm)
    with pytest.raises(ModelMismatchError, match="made by model"):
        Codec.from_checkpoint(tmp_path / "other").decode(lat)


def test_module_level_api_and_default_model_env(tmp_path, codec, monkeypatch):
    monkeypatch.setenv("VQDIFF_MODEL", str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="VQDIFF_MODEL"):
        default_model_dir()
    monkeypatch.setenv("VQDIFF_MODEL", str(tmp_path / "model"))
    lat = encode(_random_bundle(n=5))
    assert len(decode(lat).streamlines) == 5


def test_real_bundle_round_trip_through_random_model(subject_dir, tmp_path):
    trk = nib.streamlines.load(subject_dir / "IFOF_R.trk")
    streamlines = list(trk.streamlines)
    norm = Normalisation.fit(np.concatenate(streamlines))
    save_checkpoint(tmp_path / "m", StreamlineAutoencoder.from_config(ModelConfig.for_kind("vq_diff")), norm)
    codec = Codec.from_checkpoint(tmp_path / "m")
    bundle = Bundle(streamlines, SpatialHeader(trk.affine, (256, 256, 256), (1.0, 1.0, 1.0)), "trk", "IFOF_R")
    lat = codec.encode(bundle)
    assert lat.latents.shape == (45, 64, 16, 16) and lat.n_streamlines == 2880
    lat.save(tmp_path / "IFOF_R.vqlat")
    out = codec.decode(Latents.load(tmp_path / "IFOF_R.vqlat"))
    assert len(out.streamlines) == 2880 and out.name == "IFOF_R"
    assert all(s.shape == (64, 3) and np.isfinite(s).all() for s in out.streamlines)
    np.testing.assert_array_equal(out.header.affine, bundle.header.affine)
    # the decoded groups, re-ordered through the stored permutation, are what the model produced
    groups = codec.decode_groups(lat.latents)
    slot0 = norm.invert(groups.transpose(0, 2, 3, 1))[0, 0]
    first = lat.order[0]
    expected = out.streamlines[first][::-1] if lat.flipped[first] else out.streamlines[first]
    np.testing.assert_allclose(expected, slot0, atol=1e-5)


def test_range_warning_has_the_numbers(codec):
    """A bundle far outside the training range is encoded with a warning that gives its numbers."""
    bundle = _random_bundle()
    far = Bundle([s * 50 + 5000 for s in bundle.streamlines], bundle.header, "trk", "far")
    x, state = codec.pipeline.prepare_encode(far)
    (w,) = state.warnings
    assert w["code"] == "out_of_training_range" and w["fraction_points_outside"] == 1.0
    assert "widened by 25% of its extent" in w["message"] and "{" not in w["message"]
    assert w["input_min"][0] > 1000 and len(w["training_max"]) == 3
    assert codec.pipeline.prepare_encode(bundle)[1].warnings == []
