"""Multi-bundle files without groups (`vqdiff.segment`) and the registration's at-bound warning.

The multi-bundle inputs are built here: a few subject01 bundles (the bundled model's training
subject, in model space), each subsampled to every 6th streamline to keep the tests fast, concatenated
into one file in memory; each streamline remembers its source bundle. The atlas is the one the
bundled model carries (``models/default/templates.safetensors``). AFQ's cross-subject bundles are
validation data and appear only in ``benchmarks/bench_segment.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vqdiff.codec import load_templates
from vqdiff.registration import register, transform
from vqdiff.segment import UNASSIGNED, detect, segment, segmenter
from vqdiff.slr import compose44, fit

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("CC_Fr_1", "IFOF_L", "ILF_R", "MCP", "PYT_R", "FPT_L")
STEP = 6


@pytest.fixture(scope="module")
def templates():
    return load_templates(REPO / "models" / "default")


@pytest.fixture(scope="module")
def bundles(subject_dir) -> dict[str, list[np.ndarray]]:
    from vqdiff.io import load_bundle

    return {n: list(load_bundle(subject_dir / f"{n}.trk").streamlines)[::STEP] for n in SOURCES}


@pytest.fixture(scope="module")
def concatenated(bundles):
    """(streamlines, source bundle of each) of the concatenation, in file order."""
    streamlines = [s for n in SOURCES for s in bundles[n]]
    return streamlines, np.repeat(SOURCES, [len(bundles[n]) for n in SOURCES])


def _strays(n: int = 40) -> list[np.ndarray]:
    """Straight streamlines above the brain (z 95-105 mm, model space), where no atlas bundle is."""
    t = np.linspace(-30, 30, 50)[:, None]
    return [np.hstack([t, np.full_like(t, 5.0 * (k % 8)), np.full_like(t, 95.0 + k % 10)]).astype(np.float32)
            for k in range(n)]


def _covers_once(seg, n: int) -> None:
    indices = np.concatenate([p.indices for p in seg.parts])
    assert np.array_equal(np.sort(indices), np.arange(n)), "every streamline exactly once"
    assert len({p.name for p in seg.parts}) == len(seg.parts)


def test_detection_multi_for_a_concatenation_single_for_a_bundle(templates, bundles, concatenated):
    det = detect(concatenated[0], templates)
    assert det.multi and "clusters" in det.reasons and det.clusters >= 3
    for name in ("IFOF_L", "MCP", "CC_Fr_1"):
        one = detect(bundles[name], templates)
        assert not one.multi, (name, one.to_dict())
    # a single bundle moved by a similarity (another subject's space) is still one bundle
    moved = transform(bundles["IFOF_L"], compose44([10, -15, 8, 10, -8, 5, 1.2]))
    assert not detect(moved, templates).multi


def test_segmentation_partition_and_named_parts(templates, concatenated):
    streamlines, source = concatenated
    strays = _strays()
    seg = segment(streamlines + strays, templates, name="file")
    assert seg.method == "recobundles" and seg.detection.multi
    _covers_once(seg, len(streamlines) + len(strays))
    owner = seg.owner()
    names = np.array([p.name for p in seg.parts])
    # the streamlines no atlas bundle claims come back as unnamed parts, none of them in a named part
    assert all(n.startswith(UNASSIGNED) for n in set(names[owner[len(streamlines):]]))
    # each source bundle's streamlines are mostly in the part named after it (projection tracts
    # overlap: PYT and FPT share streamlines' courses, hence the lower bar for them)
    for bundle in SOURCES:
        share = float(np.mean(names[owner[:len(streamlines)][source == bundle]] == bundle))
        assert share >= (0.7 if bundle in ("PYT_R", "FPT_L") else 0.9), (bundle, share)
    # and a part named after a source bundle is mostly that bundle; parts named after atlas bundles the
    # file does not hold (the neighbours of PYT_R and FPT_L) are small
    for p in seg.parts:
        if p.atlas_bundle:
            assert p.atlas_bundle == p.name and np.isfinite(p.distance_mm)
            members = p.indices[p.indices < len(streamlines)]
            if p.name in SOURCES:
                assert np.mean(source[members] == p.name) >= 0.7, p.name
            else:
                assert len(members) <= 0.05 * len(streamlines), p.name
    kinds = {w["code"] for w in seg.warnings()}
    assert "multi_bundle" in kinds
    assert seg.to_dict()["parts"][0]["streamlines"] == len(seg.parts[0].indices)


def test_segmentation_of_a_file_in_another_space(templates, concatenated):
    streamlines, source = concatenated
    matrix = compose44([12, -20, 6, 8, -6, 4, 1.1])
    seg = segment(transform(streamlines, matrix), templates, mode="on")
    _covers_once(seg, len(streamlines))
    assert seg.registration["method"] == "similarity"
    # the recorded transform brings the file back near model space (the inverse of the move)
    back = seg.matrix @ matrix
    assert np.abs(back[:3, :3] - np.eye(3)).max() < 0.15 and np.abs(back[:3, 3]).max() < 10
    assert all(np.array_equal(p.matrix, seg.matrix) for p in seg.parts)
    names = np.array([p.name for p in seg.parts])[seg.owner()]
    for bundle in ("CC_Fr_1", "IFOF_L", "MCP"):
        assert np.mean(names[source == bundle] == bundle) >= 0.8, bundle


def test_single_bundle_and_off_mode_give_one_part(templates, bundles, concatenated):
    one = segment(bundles["IFOF_L"], templates, name="IFOF_L")
    assert one.method == "single" and one.to_parts()[0][0] == "IFOF_L" and one.warnings() == []
    _covers_once(one, len(bundles["IFOF_L"]))
    off = segment(concatenated[0], templates, mode="off", name="file")
    assert [n for n, _ in off.to_parts()] == ["file"]
    (w,) = [w for w in off.warnings() if w["code"] == "multi_bundle"]
    assert "segmentation off" in w["message"] and w["multi"]
    with pytest.raises(ValueError, match="'auto', 'on', 'off'"):
        segment(concatenated[0], templates, mode="yes")


def test_segmenter_is_the_callable_a_subject_takes(templates, concatenated):
    from vqdiff.bundle import Bundle, SpatialHeader

    bundle = Bundle(concatenated[0], SpatialHeader.identity(), name="file")
    parts = segmenter(templates)(bundle)
    assert {n for n, _ in parts} >= {"CC_Fr_1", "IFOF_L", "MCP"}
    assert sum(len(i) for _, i in parts) == len(bundle)


def test_registration_at_bound_is_said(templates, bundles):
    # IFOF_L blown up 2.5 times needs a scale of 0.4: the registration stops at the lower bound 0.6
    big = transform(bundles["IFOF_L"], compose44([0, 0, 0, 0, 0, 0, 2.5]))
    reg = register(big, templates, hint="IFOF_L")
    assert "scale" in reg.at_bound and reg.scale == pytest.approx(0.6, abs=1e-3)
    (w,) = [w for w in reg.warnings() if w["code"] == "registration_at_bound"]
    assert "scale 0.60" in w["message"] and w["scale_range"] == [0.6, 1.4]
    assert reg.to_dict()["at_bound"] == list(reg.at_bound)
    # a bundle within the bounds: no such warning
    fine = register(transform(bundles["IFOF_L"], compose44([5, 5, 0, 5, 0, 0, 1.1])), templates, hint="IFOF_L")
    assert fine.at_bound == () and all(w["code"] != "registration_at_bound" for w in fine.warnings())


def test_fit_reports_a_rotation_at_its_bound(templates):
    # a template's centroids rotated by 60 degrees about z: the fit stops at the 30 degrees bound
    static = templates.centroids["IFOF_L"]
    moving = transform(list(static), compose44([0, 0, 0, 0, 0, 60]))
    f = fit(np.asarray(moving), static, model="rigid")
    assert "rotation_z" in f.at_bound
    assert fit(static, static, model="rigid").at_bound == ()


def test_pipeline_warns_when_the_registration_sits_at_a_bound(templates, bundles):
    from vqdiff.bundle import Bundle, SpatialHeader
    from vqdiff.codec import Pipeline
    from vqdiff.normalise import Normalisation

    norm = Normalisation.fit(np.concatenate(bundles["IFOF_L"]))
    pipe = Pipeline(norm, {"id": "test", "sha256": "0" * 64}, templates)
    big = transform(bundles["IFOF_L"], compose44([0, 0, 0, 0, 0, 0, 2.5]))
    _, state = pipe.prepare_encode(Bundle(big, SpatialHeader.identity(), name="IFOF_L"))
    assert "registration_at_bound" in {w["code"] for w in state.warnings}


@pytest.fixture(scope="module")
def codec():
    from vqdiff.codec import Codec

    return Codec.default()


def test_encode_file_segments_a_multi_bundle_file(codec, concatenated, subject_dir, tmp_path):
    """`Codec.encode_file` on a concatenation written as one TRK: a subject whose parts are the found
    bundles, the segmentation recorded, every streamline back at its place; ``segment="off"`` encodes
    it as one bundle, as before."""
    from vqdiff.bundle import Bundle
    from vqdiff.io import load_bundle, save_bundle
    from vqdiff.latents import Latents
    from vqdiff.quality import streamline_mdf
    from vqdiff.subject import Subject, load_latents

    header = load_bundle(subject_dir / "MCP.trk").header
    save_bundle(Bundle(concatenated[0], header, "trk", "file"), tmp_path / "file.trk")
    original = load_bundle(tmp_path / "file.trk")
    subject = codec.encode_file(tmp_path / "file.trk")
    assert isinstance(subject, Subject) and {"CC_Fr_1", "IFOF_L", "MCP"} <= set(subject.names)
    assert subject.source["segmentation"]["method"] == "recobundles"
    subject.save(tmp_path / "file.vqlat")
    back = load_latents(tmp_path / "file.vqlat")
    assert back.source["segmentation"] == json_roundtrip(subject.source["segmentation"])
    recon = codec.decode(back, restore_points=True)
    assert [len(s) for s in recon.streamlines] == [len(s) for s in original.streamlines]
    assert float(streamline_mdf(original, recon).mean()) < 1.0  # streamline i against streamline i
    assert isinstance(codec.encode_file(tmp_path / "file.trk", segment="off", fidelity=False), Latents)


def test_roundtrip_cli_segments(concatenated, subject_dir, tmp_path, capsys):
    import json

    from vqdiff.bundle import Bundle
    from vqdiff.cli.roundtrip import main
    from vqdiff.io import load_bundle, save_bundle

    header = load_bundle(subject_dir / "MCP.trk").header
    save_bundle(Bundle(concatenated[0], header, "trk", "file"), tmp_path / "file.trk")
    with pytest.raises(SystemExit) as done:
        main([str(tmp_path / "file.trk"), str(tmp_path / "f.vqlat"), str(tmp_path / "r.trk"), "--segment", "on"])
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert {"CC_Fr_1", "IFOF_L", "MCP"} <= set(report["bundles"])
    assert report["streamlines_out"] == len(concatenated[0])


def json_roundtrip(d):
    import json

    return json.loads(json.dumps(d))


def test_batch_segments_as_encode_file_does(codec, concatenated, subject_dir, tmp_path):
    """`vqdiff-encode-batch` writes the same subject file for a multi-bundle file as `Codec.encode_file`
    (one engine call of all the subject's groups on both paths), and ``segment="off"`` one bundle."""
    from vqdiff.batch.job import run_batch
    from vqdiff.bundle import Bundle
    from vqdiff.io import load_bundle, save_bundle
    from vqdiff.latents import Latents
    from vqdiff.subject import load_latents

    header = load_bundle(subject_dir / "MCP.trk").header
    (tmp_path / "in" / "sub-01").mkdir(parents=True)
    src = tmp_path / "in" / "sub-01" / "file.trk"
    save_bundle(Bundle(concatenated[0], header, "trk", "file"), src)
    api = codec.encode_file(src)
    groups = sum(p.latents.n_groups for p in api.parts)
    summary = run_batch("encode", tmp_path / "in", tmp_path / "out", backend="torch", batch_size=groups,
                        progress=False)
    assert summary["done"] == 1, summary
    assert (tmp_path / "out" / "sub-01" / "file.vqlat").read_bytes() == api.to_bytes()
    summary = run_batch("encode", tmp_path / "in", tmp_path / "off", backend="torch", progress=False,
                        segment="off", fidelity=False)
    assert summary["done"] == 1, summary
    off = load_latents(tmp_path / "off" / "sub-01" / "file.vqlat")
    assert isinstance(off, Latents) and off.n_streamlines == len(concatenated[0])


def test_prepare_file_shares_its_clustering_with_the_same_bits(codec, bundles, concatenated, subject_dir,
                                                              monkeypatch):
    """`vqdiff.filesteps.prepare_file` clusters a file once (`vqdiff.templates.shared_centroids`) for
    segment=auto's detection and its registrations: the engine input and the state are the same bits as
    with every step clustering on its own, for one bundle moved out of model space and for a multi-bundle file."""
    import contextlib

    import vqdiff.templates as T
    from vqdiff.bundle import Bundle
    from vqdiff.filesteps import prepare_file
    from vqdiff.io import load_bundle

    header = load_bundle(subject_dir / "MCP.trk").header
    moved = transform(bundles["FPT_L"], compose44(np.r_[-20.0, 10.0, 5.0, -5.0, 8.0, 3.0, 0.9]))
    calls, sharing = [], T.shared_centroids
    plain = T._bundle_centroids
    monkeypatch.setattr(T, "_bundle_centroids", lambda *a: calls.append(1) or plain(*a))
    for streamlines, name in ((moved, "FPT_L"), (concatenated[0], "file")):
        out = []
        for shared in (True, False):
            monkeypatch.setattr(T, "shared_centroids", sharing if shared else contextlib.nullcontext)
            calls.clear()
            x, state = prepare_file(codec.pipeline, Bundle(list(streamlines), header, "trk", name), input_sha256="a")
            fields = {k: v for k, v in vars(state).items() if k != "bundle"}
            if "states" in fields:
                fields["states"] = [{k: v for k, v in vars(s).items() if k != "bundle"} for s in state.states]
            with np.printoptions(threshold=np.inf):
                out.append((x.tobytes(), repr(fields), len(calls)))
        assert out[0][:2] == out[1][:2], name
        assert out[0][2] < out[1][2], (name, out[0][2], out[1][2])  # fewer clusterings when shared
