"""Subjects, not files: a TRX with groups encoded group by group into one subject file and decoded back
(names, members, order), carried data (TRX groups / dps / dpv, TRK scalars / properties) through files
and latents, the rule for streamlines in no group or several, bad groups, and fidelity in every
latents file.

Data: subject01 (the training subject, within-subject) and AFQ (another subject: cross-subject
validation data, never trained on), small bundles of each, real files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import shared_data_dir

from vqdiff.bundle import Bundle
from vqdiff.carried import carried_equal, join_bundles
from vqdiff.errors import BundleFormatError, LatentsFormatError
from vqdiff.io import load_bundle, save_bundle
from vqdiff.quality import reconstruction_quality
from vqdiff.subject import UNGROUPED, Subject, group_parts, load_latents, subject_parts

AFQ = shared_data_dir() / "crosssubject" / "afq_browser"


@pytest.fixture(scope="module")
def codec():
    from vqdiff.codec import Codec

    return Codec.default()


def _grouped_trx(paths, tmp_path, seed=0) -> tuple:
    """A TRX built in the test from per-bundle files: their streamlines shuffled together (so that order
    matters), one group per file named by its stem. Returns (path, the bundles, each one's indices)."""
    bundles = [load_bundle(p) for p in paths]
    lines = [s for b in bundles for s in b.streamlines]
    perm = np.random.default_rng(seed).permutation(len(lines))  # file position -> original streamline
    where = np.empty_like(perm)
    where[perm] = np.arange(len(perm))
    starts = np.cumsum([0] + [len(b) for b in bundles])
    groups = {b.name: np.sort(where[starts[i]:starts[i + 1]]) for i, b in enumerate(bundles)}
    out = tmp_path / "subject.trx"
    save_bundle(Bundle([lines[i] for i in perm], bundles[0].header, "trx", "subject", groups=groups), out)
    return out, bundles, groups


def _check_subject_roundtrip(codec, paths, tmp_path):
    src, bundles, groups = _grouped_trx(paths, tmp_path)
    original = load_bundle(src)
    subject = codec.encode_file(src)
    assert isinstance(subject, Subject) and subject.names == list(groups)
    subject.save(tmp_path / "subject.vqlat")
    back = load_latents(tmp_path / "subject.vqlat")
    assert isinstance(back, Subject) and back.to_bytes() == subject.to_bytes()
    save_bundle(codec.decode(back, restore_points=True), tmp_path / "recon.trx")
    recon = load_bundle(tmp_path / "recon.trx")
    assert list(recon.groups) == list(groups)
    assert all(np.array_equal(recon.groups[k], groups[k]) for k in groups)
    assert [len(s) for s in recon.streamlines] == [len(s) for s in original.streamlines]
    per_streamline = reconstruction_quality(original, recon)  # order: streamline i against streamline i
    assert per_streamline["mean_mdf_mm"] < 2.0, per_streamline
    gaps = {}
    for b in bundles:  # each group against encoding that bundle's own file
        own = reconstruction_quality(b, codec.decode(codec.encode(b, fidelity=False), restore_points=True))
        idx = groups[b.name]
        part = reconstruction_quality(Bundle([original.streamlines[i] for i in idx], original.header),
                                      Bundle([recon.streamlines[i] for i in idx], original.header))
        gaps[b.name] = (part["mean_mdf_mm"], own["mean_mdf_mm"])
        assert abs(part["mean_mdf_mm"] - own["mean_mdf_mm"]) <= 0.1, gaps
        assert subject.fidelity[b.name]["mean_mdf_mm"] == pytest.approx(part["mean_mdf_mm"], abs=0.05)
    return gaps


def test_trx_with_groups_from_subject01_round_trips(codec, subject_dir, tmp_path):
    """Built here from three subject01 bundles (within-subject)."""
    _check_subject_roundtrip(codec, [subject_dir / f"{n}.trk" for n in ("PYT_R", "FPT_L", "POPT_L")], tmp_path)


def test_trx_with_groups_from_afq_round_trips(codec, tmp_path):
    """Built here from four AFQ bundles (another subject: validation data)."""
    if not AFQ.is_dir():
        pytest.skip(f"AFQ data not found at {AFQ}")
    names = ("Right_IFOF", "Right_ILF", "Left_Uncinate", "Right_Cingulum_Hippocampus")
    _check_subject_roundtrip(codec, [AFQ / f"{n}.trk" for n in names], tmp_path)


def test_the_rule_for_no_group_and_several_groups():
    """A streamline in several groups is encoded in the first of them (file order); those in none form
    ``ungrouped``; every group's members are kept as the file listed them."""
    lines = [np.full((3, 3), i, np.float32) + np.arange(3)[:, None] for i in range(20)]
    b = Bundle(lines, load_header(), groups={
        "B": np.array([9, 5, 6, 7, 8]), "A": np.arange(0, 8), "ungrouped": np.array([19])})
    parts = dict(group_parts(b))
    assert list(parts) == ["B", "A", "ungrouped", f"{UNGROUPED}_2"]
    assert parts["B"].tolist() == [5, 6, 7, 8, 9] and parts["A"].tolist() == [0, 1, 2, 3, 4]
    assert parts["ungrouped"].tolist() == [19] and parts[f"{UNGROUPED}_2"].tolist() == list(range(10, 19))
    assert subject_parts(Bundle(lines, load_header(), name="x"))[0][0] == "x"


def load_header():
    from vqdiff.bundle import SpatialHeader

    return SpatialHeader.identity()


def test_overlapping_groups_decode_exactly(codec, subject_dir, tmp_path):
    b = load_bundle(subject_dir / "PYT_R.trk")
    n = len(b)
    b.groups = {"PYT_R": np.arange(0, 200), "PYT_R_core": np.arange(150, 250)[::-1]}  # 70 streamlines in none
    b.dps = {"id": np.arange(n)}
    subject = codec.encode_subject(b, fidelity=False)
    assert [(p.name, len(p.members)) for p in subject.parts] == [("PYT_R", 200), ("PYT_R_core", 50),
                                                               ("ungrouped", n - 250)]
    out = codec.decode(Subject.from_bytes(subject.to_bytes()))
    assert np.array_equal(out.groups["PYT_R_core"], np.arange(150, 250)[::-1])
    assert len(out) == n and reconstruction_quality(b, out)["mean_mdf_mm"] < 1.5
    assert np.array_equal(out.dps["id"], np.arange(n))
    by_name = codec.decode_subject(subject)  # each bundle with its rows of the file's dps
    assert by_name["ungrouped"].dps["id"].tolist() == list(range(250, n)) and len(by_name["PYT_R_core"]) == 50


def _with_data(b: Bundle) -> Bundle:
    rng = np.random.default_rng(1)
    m = sum(len(s) for s in b.streamlines)
    b.dps = {"weight": rng.random(len(b)).astype(np.float32), "rgb": rng.random((len(b), 3)).astype(np.float32)}
    b.dpv = {"fa": rng.random(m).astype(np.float32), "dir": rng.random((m, 3)).astype(np.float32)}
    return b


@pytest.mark.parametrize("fmt", ["trx", "trk"])
def test_carried_data_round_trip_through_files_and_latents(codec, subject_dir, tmp_path, fmt, caplog):
    """TRX dps/dpv and TRK properties/scalars: read back equal, and after encode/decode (restore_points)."""
    b = _sample(subject_dir)
    _with_data(b)
    save_bundle(b, tmp_path / f"in.{fmt}")
    read = load_bundle(tmp_path / f"in.{fmt}")
    for kind in ("dps", "dpv"):
        assert sorted(getattr(read, kind)) == sorted(getattr(b, kind))
        assert all(np.array_equal(getattr(read, kind)[k], getattr(b, kind)[k]) for k in getattr(b, kind))
    lat = codec.encode_file(tmp_path / f"in.{fmt}")
    out = codec.decode(load_latents(lat.to_bytes()), restore_points=True)
    save_bundle(out, tmp_path / f"out.{fmt}")
    again = load_bundle(tmp_path / f"out.{fmt}")
    assert carried_equal(again, read)
    with caplog.at_level(logging.WARNING):
        assert codec.decode(lat).dpv == {}  # 64 points: the per-point data cannot come back
    assert "restore_points" in caplog.text and "'fa'" in caplog.text


def _sample(subject_dir, n: int = 70) -> Bundle:
    """70 PYT_R streamlines cut to varied lengths (the readers' general path)."""
    b = load_bundle(subject_dir / "PYT_R.trk")
    k = np.random.default_rng(0).integers(2, 64, n)
    return Bundle([s[:int(j)] for s, j in zip(b.streamlines[:n], k, strict=True)], b.header, "trk", "PYT_R")


def test_formats_that_cannot_hold_data_say_what_they_drop(subject_dir, tmp_path, caplog):
    b = _with_data(_sample(subject_dir))
    b.groups = {"g": np.arange(3)}
    with caplog.at_level(logging.WARNING):
        save_bundle(b, tmp_path / "x.tck")
        save_bundle(b, tmp_path / "x.trk")
    assert "TCK file cannot hold group 'g', dps 'weight', dps 'rgb', dpv 'fa', dpv 'dir'" in caplog.text
    assert "TRK file cannot hold group 'g'" in caplog.text


@pytest.mark.parametrize("members, dtype, words", [
    ([0, 99], "uint32", "refers to streamline"), ([], "uint32", "is empty"), ([1.0, 2.0], "float32", "not integers"),
    ([3, 3], "int64", "more than once")])
def test_bad_groups_get_a_clear_error(subject_dir, tmp_path, members, dtype, words):
    import zipfile

    b = _sample(subject_dir)
    save_bundle(b, tmp_path / "x.trx")
    with zipfile.ZipFile(tmp_path / "x.trx", "a") as zf:
        zf.writestr(f"groups/G.{dtype}", np.asarray(members, dtype).tobytes())
    with pytest.raises(BundleFormatError, match=words) as exc:
        load_bundle(tmp_path / "x.trx")
    assert exc.value.reason == "bad_groups" and "integer streamline indices" in str(exc.value)


def test_bad_carried_data_get_a_clear_error(subject_dir, tmp_path):
    b = _sample(subject_dir)
    b.dps = {"w": np.zeros(len(b) + 1)}
    with pytest.raises(BundleFormatError, match="one row per streamline") as exc:
        save_bundle(b, tmp_path / "x.trx")
    assert exc.value.reason == "bad_carried_data"


def test_fidelity_in_every_latents_file_and_two_warnings(codec, subject_dir, caplog):
    b = load_bundle(subject_dir / "PYT_R.trk")
    lat = codec.encode(b)
    meta = json.loads(lat.to_bytes()[8:8 + int.from_bytes(lat.to_bytes()[:8], "little")])["__metadata__"]
    fid = json.loads(meta["fidelity"])
    assert 0 < fid["mean_mdf_mm"] <= fid["p95_mdf_mm"] <= fid["max_mdf_mm"] and fid["poor"] is False
    assert "metrics.json" in fid["limits"]["origin"]
    plain = codec.encode(b, fidelity=False).to_bytes()  # without it: the file as before (no new keys)
    meta0 = json.loads(plain[8:8 + int.from_bytes(plain[:8], "little")])["__metadata__"]
    assert set(meta0) == {"format", "format_version", "model", "normalisation", "header", "source", "registration",
                          "provenance"}
    strict = dict(codec.pipeline.limits, mean_mdf_mm=0.1)
    old, codec.pipeline.limits = codec.pipeline.limits, strict
    try:
        with caplog.at_level(logging.WARNING):
            assert codec.encode(b).fidelity["poor"] is True
    finally:
        codec.pipeline.limits = old
    assert "PYT_R comes back at mean MDF" in caplog.text


def test_unknown_bundle_makes_no_quality_claim():
    from vqdiff.registration import Registration

    w = Registration(np.eye(4), "MCP", 12.0, "similarity", known=False, threshold_mm=9.0, reason="residual").warning()
    assert w["code"] == "unknown_bundle" and "may be poor" not in w["message"] and "12.0 mm" in w["message"]


def test_batch_per_subject_matches_the_api_and_decodes(codec, subject_dir, tmp_path):
    from vqdiff.batch.job import run_batch

    names = ("PYT_R", "FPT_L")
    (tmp_path / "in" / "sub-01").mkdir(parents=True)
    for n in names:
        (tmp_path / "in" / "sub-01" / f"{n}.trk").symlink_to(subject_dir / f"{n}.trk")
    joined = join_bundles([load_bundle(subject_dir / f"{n}.trk") for n in sorted(names)], name="sub-01")
    api = codec.encode_subject(joined)
    groups = sum(p.latents.n_groups for p in api.parts)
    summary = run_batch("encode", tmp_path / "in", tmp_path / "out", backend="torch", batch_size=groups,
                        progress=False, per_subject=True)
    assert summary["done"] == 1, summary
    batch = Subject.load(tmp_path / "out" / "sub-01.vqlat")
    assert [p.latents.to_bytes() for p in batch.parts] == [p.latents.to_bytes() for p in api.parts]
    rec = json.loads((tmp_path / "out" / "index.jsonl").read_text())
    assert set(rec["bundles"]) == set(names) and all(v["fidelity"]["mean_mdf_mm"] for v in rec["bundles"].values())
    summary = run_batch("decode", tmp_path / "out", tmp_path / "rec", backend="torch", progress=False, format="trx")
    assert summary["done"] == 1, summary
    out = load_bundle(tmp_path / "rec" / "sub-01.trx")
    assert {k: v.tolist() for k, v in out.groups.items()} == {k: v.tolist() for k, v in joined.groups.items()}


def test_subject_files_refuse_damage_and_unknown_versions(codec, subject_dir):
    b = _sample(subject_dir)
    b.groups = {"a": np.arange(30), "b": np.arange(30, 70)}
    data = codec.encode_subject(b, fidelity=False).to_bytes()
    assert isinstance(load_latents(data), Subject)
    bumped = data.replace(b'"format_version":"1"', b'"format_version":"9"', 1)
    assert bumped != data
    with pytest.raises(LatentsFormatError, match="version"):
        load_latents(bumped)
    with pytest.raises(LatentsFormatError):
        load_latents(data[: len(data) // 2])


def test_roundtrip_cli_on_a_subject_trx_and_a_tck(subject_dir, tmp_path, capsys):
    """`vqdiff-roundtrip subject.trx out.vqlat recon.trx` (same arguments as for one bundle); `.tck` with
    --reference as before."""
    from vqdiff.cli.roundtrip import main

    b = _sample(subject_dir)
    b.groups = {"PYT_R": np.arange(0, 50), "PYT_R_tail": np.arange(40, 70)}
    b.dps = {"w": np.arange(len(b), dtype=np.float32)}
    save_bundle(b, tmp_path / "subject.trx")
    with pytest.raises(SystemExit) as done:
        main([str(tmp_path / "subject.trx"), str(tmp_path / "s.vqlat"), str(tmp_path / "r.trx")])
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["bundles"]) == {"PYT_R", "PYT_R_tail"} and report["bundles"]["PYT_R_tail"]["streamlines"] == 20
    assert all(v["fidelity"]["mean_mdf_mm"] > 0 for v in report["bundles"].values())
    back = load_bundle(tmp_path / "r.trx")
    assert carried_equal(back, load_bundle(tmp_path / "subject.trx"))
    save_bundle(b, tmp_path / "b.tck")
    with pytest.raises(SystemExit) as done:
        main([str(tmp_path / "b.tck"), str(tmp_path / "b.vqlat"), str(tmp_path / "b_recon.trk"), "--reference",
              str(subject_dir / "PYT_R.trk")])
    assert done.value.code == 0 and "fidelity" in json.loads(capsys.readouterr().out)


def test_groups_ride_along_in_a_single_latents(codec, subject_dir):
    """`Codec.encode` keeps returning `Latents` for a bundle with groups; they are carried and come back."""
    b = _sample(subject_dir)
    b.groups = {"x": np.array([5, 1, 3])}
    lat = codec.encode(b, fidelity=False)
    out = codec.decode(load_latents(lat.to_bytes()))
    assert type(lat).__name__ == "Latents" and out.groups["x"].tolist() == [5, 1, 3]


def test_carried_data_interoperate_with_trx_python(subject_dir, tmp_path):
    """trx-python (the field's TRX library) reads our groups / dps / dpv, and we read what it writes."""
    from trx import trx_file_memmap as tmm

    b = _with_data(_sample(subject_dir))
    b.groups = {"A": np.arange(0, 40), "B": np.arange(40, 70)}
    theirs = tmm.load(str(save_bundle(b, tmp_path / "ours.trx")))
    try:
        assert {k: np.asarray(v).tolist() for k, v in theirs.groups.items()} == {k: v.tolist() for k, v in
                                                                                b.groups.items()}
        assert np.array_equal(np.asarray(theirs.data_per_streamline["rgb"]), b.dps["rgb"])
        assert np.array_equal(np.asarray(theirs.data_per_vertex["fa"]._data).ravel(), b.dpv["fa"])
        tmm.save(theirs, str(tmp_path / "theirs.trx"))
    finally:
        theirs.close()
    assert carried_equal(load_bundle(tmp_path / "theirs.trx"), load_bundle(tmp_path / "ours.trx"))


def test_batch_encodes_a_trx_with_groups_as_the_api_does(codec, subject_dir, tmp_path):
    """A TRX with groups among per-file inputs is a subject there too: the same bytes as `encode_file`."""
    from vqdiff.batch.job import run_batch

    b = load_bundle(subject_dir / "PYT_R.trk")
    b.groups = {"PYT_R": np.arange(0, 250), "Left_Arcuate": np.arange(250, 320)}
    (tmp_path / "in" / "sub-01").mkdir(parents=True)
    save_bundle(b, tmp_path / "in" / "sub-01" / "both.trx")
    api = codec.encode_file(tmp_path / "in" / "sub-01" / "both.trx")
    g = sum(p.latents.n_groups for p in api.parts)
    summary = run_batch("encode", tmp_path / "in", tmp_path / "out", backend="torch", batch_size=g, progress=False)
    assert summary["done"] == 1, summary
    assert (tmp_path / "out" / "sub-01" / "both.vqlat").read_bytes() == api.to_bytes()
    assert summary["flagged"]["unknown_bundle"] == ["sub-01/both.trx:Left_Arcuate"]  # no template of an arcuate
    again = run_batch("encode", tmp_path / "in", tmp_path / "out", backend="torch", batch_size=g, progress=False)
    assert again["skipped"] == 1, again


def test_trx_data_vqdiff_does_not_carry_is_named(subject_dir, tmp_path, caplog):
    import zipfile

    save_bundle(_sample(subject_dir), tmp_path / "x.trx")
    with zipfile.ZipFile(tmp_path / "x.trx", "a") as zf:
        zf.writestr("dpg/G/mean_fa.float32", np.zeros(1, np.float32).tobytes())
    with caplog.at_level(logging.WARNING):
        assert len(load_bundle(tmp_path / "x.trx")) == 70
    assert "dpg/G/mean_fa.float32" in caplog.text and "not carried" in caplog.text
