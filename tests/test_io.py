"""vqdiff.io: round trips of TRK / TCK / TRX, the malformed-input classes and the file-handling contract."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.streamlines import TckFile, Tractogram, TrkFile
from nibabel.streamlines.trk import header_2_dtype

from vqdiff import io as vio
from vqdiff.bundle import Bundle, SpatialHeader
from vqdiff.errors import BundleFormatError
from vqdiff.io import bundle_to_bytes, load_bundle, load_bundle_bytes, save_bundle, sniff_format

NB_STREAMLINES_AT = header_2_dtype.fields["nb_streamlines"][1]  # 988
HDR_SIZE_AT = header_2_dtype.fields["hdr_size"][1]  # 996
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)
LPS = SpatialHeader(
    np.array([[-2.0, 0, 0, 90], [0, -2.0, 0, 126], [0, 0, 2.0, -72], [0, 0, 0, 1]]),
    (91, 109, 91),
    (2.0, 2.0, 2.0),
    "LPS",
)


def synthetic(n=25, seed=0, header=LPS, lengths=None) -> Bundle:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 40, n) if lengths is None else lengths
    sl = [(rng.normal(size=(k, 3)) * 40 + [5, -10, 20]).astype(np.float32) for k in lengths]
    return Bundle(sl, header, name="synthetic")


def nifti_for(header: SpatialHeader, path: Path) -> Path:
    img = nib.Nifti1Image(np.zeros(header.dimensions, np.uint8), header.affine)
    img.header.set_zooms(header.voxel_sizes)
    nib.save(img, path)
    return path


def assert_same(a: Bundle, b: Bundle, *, atol=1e-4, voxel_info=True):
    assert len(a) == len(b)
    for x, y in zip(a.streamlines, b.streamlines, strict=True):
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_allclose(y, x, atol=atol, rtol=0)
    np.testing.assert_allclose(b.header.affine, a.header.affine, atol=1e-5)
    assert tuple(b.header.dimensions) == tuple(a.header.dimensions)
    if voxel_info:
        np.testing.assert_allclose(b.header.voxel_sizes, a.header.voxel_sizes, atol=1e-6)
        assert b.header.voxel_order == a.header.voxel_order


@pytest.fixture(scope="module")
def pyt(subject_dir) -> Bundle:
    return load_bundle(subject_dir / "PYT_R.trk")


@pytest.fixture
def trk_file(tmp_path) -> Path:
    """A valid 20-streamline TRK with variable lengths (exercises the general record walk)."""
    return save_bundle(synthetic(20), tmp_path / "b.trk")


@pytest.fixture
def fixed_trk(tmp_path) -> Path:
    """A valid TRK whose streamlines all have 16 points (the vectorised fast path)."""
    return save_bundle(synthetic(20, lengths=[16] * 20), tmp_path / "f.trk")


# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize("fname", ["IFOF_R.trk", "PYT_R.trk"])
def test_real_bundle_matches_manifest_and_nibabel(subject_dir, fname):
    manifest = json.loads((subject_dir / "manifest.json").read_text())[fname]
    b = load_bundle(subject_dir / fname)
    assert len(b) == manifest["streamlines"] and b.name == fname[:-4] and b.source_format == "trk"
    npts = manifest["points_per_streamline"]
    assert all(s.shape == (npts, 3) and s.dtype == np.float32 for s in b.streamlines)
    ref = nib.streamlines.load(subject_dir / fname)
    np.testing.assert_array_equal(np.concatenate(b.streamlines), ref.streamlines.get_data())
    np.testing.assert_array_equal(b.header.affine, ref.header["voxel_to_rasmm"])
    assert b.header.dimensions == (256, 256, 256) and b.header.voxel_sizes == (1.0, 1.0, 1.0)
    assert b.header.voxel_order == "RAS"


@pytest.mark.parametrize("fmt", ["trk", "tck", "trx"])
def test_real_round_trip(pyt, tmp_path, fmt):
    ref = nifti_for(pyt.header, tmp_path / "ref.nii.gz") if fmt == "tck" else None
    out = save_bundle(pyt, tmp_path / f"PYT_R.{fmt}")
    back = load_bundle(out, reference=ref)
    assert back.source_format == fmt and back.name == "PYT_R"
    assert_same(pyt, back)


def test_tck_with_trk_reference(pyt, subject_dir, tmp_path):
    back = load_bundle(save_bundle(pyt, tmp_path / "x.tck"), reference=subject_dir / "PYT_R.trk")
    assert_same(pyt, back)


@pytest.mark.parametrize("fmt", ["trk", "tck", "trx", "TRK"])
def test_synthetic_round_trip_non_trivial_affine(tmp_path, fmt):
    b = synthetic()
    out = save_bundle(b, tmp_path / f"s.{fmt}")
    ref = {"trk": None, "trx": None, "tck": nifti_for(LPS, tmp_path / "r.nii")}.get(fmt.lower())
    back = load_bundle(out, reference=ref)
    assert_same(b, back)
    if fmt == "tck":  # the other reference kinds give the same header
        assert_same(b, load_bundle(out, reference=LPS))
        assert_same(b, load_bundle(out, reference=nib.load(ref)))
        assert_same(b, load_bundle(out, reference=save_bundle(b, tmp_path / "r.trk")))


@pytest.mark.parametrize("lengths", [None, [7] * 12], ids=["variable", "fixed"])
def test_trk_with_scalars_properties_and_big_endian_matches_nibabel(tmp_path, lengths):
    b = synthetic(12, lengths=lengths)
    t = Tractogram(b.streamlines, affine_to_rasmm=np.eye(4))
    t.data_per_point["fa"] = [np.ones((len(s), 2), np.float32) for s in b.streamlines]
    t.data_per_streamline["w"] = np.arange(12, dtype=np.float32)[:, None]
    hdr = {"voxel_to_rasmm": LPS.affine, "dimensions": LPS.dimensions, "voxel_sizes": LPS.voxel_sizes,
           "voxel_order": "LPS"}
    TrkFile(t, header=hdr).save(tmp_path / "s.trk")
    assert_same(b, load_bundle(tmp_path / "s.trk"))
    ref = nib.streamlines.load(tmp_path / "s.trk").streamlines.get_data()
    np.testing.assert_array_equal(np.concatenate(load_bundle(tmp_path / "s.trk").streamlines), ref)
    # Byte-swap the whole file: nibabel detects big-endian from hdr_size.
    raw = bytearray((tmp_path / "s.trk").read_bytes())
    swapped = np.frombuffer(raw, ">i4", offset=1000).byteswap().tobytes()
    h = np.frombuffer(raw[:1000], header_2_dtype).copy().astype(header_2_dtype.newbyteorder(">"))
    (tmp_path / "be.trk").write_bytes(h.tobytes() + swapped)
    assert nib.streamlines.load(tmp_path / "be.trk").header["endianness"] == ">"
    assert_same(b, load_bundle(tmp_path / "be.trk"))


def test_trx_interoperates_with_trx_python(tmp_path):
    from trx import trx_file_memmap as tmm

    b = synthetic(15)
    ours = tmm.load(str(save_bundle(b, tmp_path / "ours.trx")))
    try:
        np.testing.assert_array_equal(ours.streamlines.get_data(), np.concatenate(b.streamlines))
        assert len(ours.streamlines) == 15
    finally:
        ours.close()
    ref = {"NB_VERTICES": 0, "VOXEL_TO_RASMM": LPS.affine, "DIMENSIONS": np.array(LPS.dimensions)}
    theirs = tmm.TrxFile.from_tractogram(Tractogram(b.streamlines, affine_to_rasmm=np.eye(4)), reference=ref)
    tmm.save(theirs, str(tmp_path / "theirs.trx"))
    theirs.close()
    assert_same(b, load_bundle(tmp_path / "theirs.trx"))


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 30), min_size=1, max_size=12),
    scale=st.floats(0.1, 300),
    seed=st.integers(0, 2**16),
    fmt=st.sampled_from(["trk", "tck", "trx"]),
)
def test_random_bundles_round_trip_through_bytes(lengths, scale, seed, fmt):
    rng = np.random.default_rng(seed)
    sl = [(rng.uniform(-1, 1, (k, 3)) * scale).astype(np.float32) for k in lengths]
    b = Bundle(sl, LPS, name="h")
    data = bundle_to_bytes(b, format=fmt)
    assert sniff_format(data) == fmt
    back = load_bundle_bytes(data, format=fmt, reference=LPS if fmt == "tck" else None, name="h")
    assert_same(b, back, atol=1e-4 * max(1.0, scale / 100))
    assert back.name == "h"


# ----------------------------------------------------------------------------- malformed inputs


def expect(reason, fn, *args, accepted=(), **kw) -> str:
    with pytest.raises(BundleFormatError) as excinfo:
        fn(*args, **kw)
    msg = str(excinfo.value)
    assert excinfo.value.reason == reason, msg
    for word in accepted:
        assert word in msg, msg
    return msg


@pytest.mark.parametrize("name", ["x.txt", "x.vtk", "x.trk.gz", "x.tckx", "noext"])
def test_unsupported_extension(trk_file, tmp_path, name):
    (tmp_path / name).write_bytes(trk_file.read_bytes())
    expect("unsupported_format", load_bundle, tmp_path / name, accepted=(".trk", ".tck", ".trx"))


def test_unsupported_format_argument(tmp_path):
    expect("unsupported_format", load_bundle_bytes, b"TRACK", format="vtk", accepted=(".trk", ".tck", ".trx"))
    exts = (".trk", ".tck", ".trx")
    expect("unsupported_format", save_bundle, synthetic(), tmp_path / "x.vtk", accepted=exts)
    expect("unsupported_format", bundle_to_bytes, synthetic(), format="obj", accepted=(".trk",))


@pytest.mark.parametrize(
    "ext,content,expected",
    [
        ("trk", PNG, "TRACK"),
        ("tck", PNG, "mrtrix tracks"),
        ("trx", PNG, "PK"),
        ("trk", np.random.default_rng(1).bytes(3000), "TRACK"),
        ("trk", b"mrtrix tracks\nEND\n", "TRACK"),
        ("trx", b"TRACK" + bytes(995), "PK"),
    ],
)
def test_wrong_magic(tmp_path, ext, content, expected):
    (tmp_path / f"x.{ext}").write_bytes(content)
    msg = expect("wrong_magic", load_bundle, tmp_path / f"x.{ext}", accepted=(expected, ".trk, "))
    if content.startswith(b"mrtrix"):
        assert "looks like a MRtrix .tck file" in msg
    expect("wrong_magic", load_bundle_bytes, content, format=ext, accepted=(expected,))


def _cut(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    out = path.with_name("cut" + path.suffix)
    out.write_bytes(data[:keep])
    return out


@pytest.mark.parametrize("keep", [-100, -3, 1500, 1004, 500, 3])
@pytest.mark.parametrize("fixture", ["trk_file", "fixed_trk"])
def test_truncated_trk(request, fixture, keep):
    path = request.getfixturevalue(fixture)
    expect("truncated", load_bundle, _cut(path, keep), accepted=("expected a complete",))


def test_trk_header_only_promising_streamlines_is_truncated(trk_file):
    expect("truncated", load_bundle, _cut(trk_file, 1000), accepted=("20 streamlines",))


def test_trk_cut_on_record_boundary_is_a_count_mismatch(fixed_trk):
    record = 4 + 16 * 12
    expect("count_mismatch", load_bundle, _cut(fixed_trk, 1000 + 19 * record), accepted=("agree",))


@pytest.mark.parametrize("keep", [-12, -7, -1, 20])
def test_truncated_tck(tmp_path, keep):
    path = save_bundle(synthetic(), tmp_path / "b.tck")
    expect("truncated", load_bundle, _cut(path, keep), reference=LPS, accepted=("expected",))


@pytest.mark.parametrize("keep", [-1, -30, 100, 10])
def test_truncated_trx(tmp_path, keep):
    path = save_bundle(synthetic(), tmp_path / "b.trx")
    expect("truncated", load_bundle, _cut(path, keep), accepted=("expected a complete TRX",))


def trx_zip(path: Path, streamlines, **header) -> Path:
    """Write a TRX zip by hand (to build what save_bundle refuses to write)."""
    lengths = [len(s) for s in streamlines]
    hdr = {"VOXEL_TO_RASMM": np.eye(4).tolist(), "DIMENSIONS": [9, 9, 9], "NB_VERTICES": int(sum(lengths)),
           "NB_STREAMLINES": len(lengths), **header}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("header.json", json.dumps(hdr))
        if streamlines:
            zf.writestr("positions.3.float32", np.concatenate(streamlines).astype("<f4").tobytes())
            zf.writestr("offsets.uint32", np.cumsum([0, *lengths]).astype("<u4").tobytes())
    return path


@pytest.mark.parametrize("fmt", ["trk", "tck", "trx"])
def test_empty(tmp_path, fmt):
    (tmp_path / f"zero.{fmt}").write_bytes(b"")  # a 0-byte file is "empty", not "truncated"
    expect("empty", load_bundle, tmp_path / f"zero.{fmt}", reference=LPS, accepted=("at least 1 streamline",))
    expect("empty", load_bundle_bytes, b"", format=fmt, accepted=("at least 1 streamline",))
    path = tmp_path / f"none.{fmt}"
    if fmt == "trk":
        TrkFile(Tractogram(affine_to_rasmm=np.eye(4))).save(path)
    elif fmt == "tck":
        TckFile(Tractogram(affine_to_rasmm=np.eye(4))).save(path)
    else:
        trx_zip(path, [])
    expect("empty", load_bundle, path, reference=LPS, accepted=("at least 1 streamline",))
    expect("empty", save_bundle, Bundle([], LPS), tmp_path / f"o.{fmt}", accepted=("at least 1 streamline",))


def _poke(path: Path, offset: int, payload: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(payload)] = payload
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite(tmp_path, trk_file, value):
    f4 = struct.pack("<f", value)
    expect("non_finite", load_bundle, _poke(trk_file, 1000 + 4 + 4 * 7, f4), accepted=("only finite",))
    tck = save_bundle(synthetic(), tmp_path / "b.tck")
    start = int(nib.streamlines.TckFile._read_header(str(tck))["_offset_data"])
    expect("non_finite", load_bundle, _poke(tck, start + 4 * 4, f4), reference=LPS, accepted=("only finite",))
    sl = synthetic(6).streamlines
    sl[2][1, 0] = value
    expect("non_finite", load_bundle, trx_zip(tmp_path / "b.trx", sl), accepted=("only finite",))
    bad = synthetic()
    bad.streamlines[3][1, 2] = value
    expect("non_finite", save_bundle, bad, tmp_path / "bad.trx", accepted=("only finite",))


@pytest.mark.parametrize("fmt", ["trk", "tck", "trx"])
@pytest.mark.parametrize("npts", [1, 0])
def test_too_few_points(tmp_path, fmt, npts):
    sl = [np.ones((5, 3), np.float32), np.ones((npts, 3), np.float32) * 2, np.ones((3, 3), np.float32)]
    path = tmp_path / f"few.{fmt}"
    t = Tractogram(sl, affine_to_rasmm=np.eye(4))
    if fmt == "trk":
        TrkFile(t).save(path)
        if npts == 0:  # nibabel silently drops an empty streamline: insert a 0-point record by hand
            raw = bytearray(path.read_bytes())
            raw[NB_STREAMLINES_AT:NB_STREAMLINES_AT + 4] = struct.pack("<i", 3)
            path.write_bytes(bytes(raw[:1064]) + struct.pack("<i", 0) + bytes(raw[1064:]))
    elif fmt == "tck":
        TckFile(t).save(path)
        if npts == 0:  # nibabel silently drops an empty streamline: add the doubled delimiter by hand
            raw = path.read_bytes().replace(b"count: 0000000002", b"count: 0000000003")
            nan3 = np.full(3, np.nan, "<f4").tobytes()
            i = raw.index(nan3)
            path.write_bytes(raw[:i] + nan3 + raw[i:])
    else:
        trx_zip(path, sl)
    msg = expect("too_few_points", load_bundle, path, reference=LPS, accepted=("at least 2 points",))
    assert "streamline 1 " in msg
    expect("too_few_points", save_bundle, Bundle(sl, LPS), tmp_path / f"o.{fmt}", accepted=("at least 2",))


def test_missing_reference(tmp_path):
    tck = save_bundle(synthetic(), tmp_path / "b.tck")
    expect("missing_reference", load_bundle, tck, accepted=("NIfTI", "SpatialHeader"))
    expect("missing_reference", load_bundle_bytes, tck.read_bytes(), format="tck", accepted=("NIfTI",))


@pytest.mark.parametrize("kind", ["missing", "garbage_nii", "garbage_trk", "txt", "int", "2d"])
def test_bad_reference(tmp_path, kind):
    tck = save_bundle(synthetic(), tmp_path / "b.tck")
    ref = {"missing": tmp_path / "nope.nii.gz", "garbage_nii": tmp_path / "g.nii", "int": 7,
           "garbage_trk": tmp_path / "g.trk", "txt": tmp_path / "ref.txt", "2d": tmp_path / "flat.nii"}[kind]
    if kind.startswith("garbage") or kind == "txt":
        ref.write_bytes(b"TRACK" + b"\x00" * 2000 if kind == "garbage_trk" else PNG)
    if kind == "2d":
        nib.save(nib.Nifti1Image(np.zeros((4, 4), np.uint8), np.eye(4)), ref)
    expect("bad_reference", load_bundle, tck, reference=ref, accepted=("NIfTI", ".trk"))


def test_trk_and_trx_ignore_the_reference(trk_file, tmp_path):
    assert len(load_bundle(trk_file, reference=tmp_path / "not-there.nii")) == 20


@pytest.mark.parametrize("declared", [21, 19, 1000])
def test_count_mismatch_trk(trk_file, fixed_trk, declared):
    for path in (trk_file, fixed_trk):
        _poke(path, NB_STREAMLINES_AT, struct.pack("<i", declared))
        msg = expect("count_mismatch", load_bundle, path, accepted=("agree",))
        assert f"declares {declared}" in msg and "20 complete" in msg


def test_trk_count_zero_means_unrecorded(trk_file):
    assert len(load_bundle(_poke(trk_file, NB_STREAMLINES_AT, struct.pack("<i", 0)))) == 20


def test_count_mismatch_tck(tmp_path):
    path = save_bundle(synthetic(), tmp_path / "b.tck")
    raw = path.read_bytes()
    assert b"count: 0000000025" in raw
    path.write_bytes(raw.replace(b"count: 0000000025", b"count: 0000000026"))
    expect("count_mismatch", load_bundle, path, reference=LPS, accepted=("agree",))


@pytest.mark.parametrize("key,delta", [("NB_STREAMLINES", 1), ("NB_STREAMLINES", -1), ("NB_VERTICES", 5)])
def test_count_mismatch_trx(tmp_path, key, delta):
    src = save_bundle(synthetic(), tmp_path / "b.trx")
    dst = tmp_path / "c.trx"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "header.json":
                hdr = json.loads(data)
                hdr[key] += delta
                data = json.dumps(hdr).encode()
            zout.writestr(info.filename, data)
    expect("count_mismatch", load_bundle, dst, accepted=("agree",))


def test_unreadable_structures(trk_file, tmp_path):
    trx = save_bundle(synthetic(), tmp_path / "crc.trx")
    with zipfile.ZipFile(trx) as zf:
        data_at = zf.getinfo("positions.3.float32").header_offset + 30 + len("positions.3.float32")
    with zipfile.ZipFile(_poke(trx, data_at + 8, b"\xff\xff")) as zf:  # the CRC no longer matches
        assert zf.testzip() == "positions.3.float32"
    expect("unreadable", load_bundle, trx, accepted=("expected header.json",))
    with pytest.raises(BundleFormatError) as excinfo:  # the library error is chained, not swallowed
        load_bundle(trx)
    assert isinstance(excinfo.value.__cause__, zipfile.BadZipFile)
    hdr = tmp_path / "hdr.trk"
    hdr.write_bytes(trk_file.read_bytes())
    _poke(hdr, HDR_SIZE_AT, struct.pack("<i", 7))
    expect("unreadable", load_bundle, hdr, accepted=("expected a TrackVis",))
    neg = tmp_path / "neg.trk"
    neg.write_bytes(trk_file.read_bytes())
    expect("unreadable", load_bundle, _poke(neg, 1000, struct.pack("<i", -5)), accepted=("non-negative",))
    nohdr = tmp_path / "nohdr.trx"
    with zipfile.ZipFile(nohdr, "w") as zf:
        zf.writestr("positions.3.float32", b"\x00" * 24)
    expect("unreadable", load_bundle, nohdr, accepted=("header.json",))
    tck = save_bundle(synthetic(), tmp_path / "b.tck")
    (tmp_path / "f64.tck").write_bytes(tck.read_bytes().replace(b"Float32LE", b"Float64LE"))
    expect("unreadable", load_bundle, tmp_path / "f64.tck", reference=LPS, accepted=("Float32LE",))
    expect("bad_shape", save_bundle, Bundle([np.ones((4, 2))], LPS), tmp_path / "s.trk", accepted=("(N, 3)",))


def test_unwritable_header_is_bad_reference(tmp_path):
    flat = SpatialHeader(np.diag([1.0, 1.0, 0.0, 1.0]), (9, 9, 9), (1.0, 1.0, 1.0), "RAS")
    bad = synthetic(3, header=flat)
    for fmt in ("trk", "trx"):
        expect("bad_reference", save_bundle, bad, tmp_path / f"x.{fmt}", accepted=("4x4",))
    assert list(tmp_path.iterdir()) == []
    save_bundle(bad, tmp_path / "x.tck")  # TCK stores no header


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.trk"):
        load_bundle(tmp_path / "nope.trk")


# ----------------------------------------------------------------------------- file handling


def test_overwrite_refused_then_allowed(tmp_path):
    a, b = synthetic(5, seed=1), synthetic(7, seed=2)
    path = save_bundle(a, tmp_path / "x.trk")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True") as excinfo:
        save_bundle(b, path)
    assert str(path) in str(excinfo.value)
    assert path.read_bytes() == before
    save_bundle(b, path, overwrite=True)
    assert len(load_bundle(path)) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.trk"]


def test_atomic_write_leaves_no_temp_files_even_on_failure(tmp_path, monkeypatch):
    path = save_bundle(synthetic(5), tmp_path / "x.trx")
    good = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vio.write, "_write", boom)
    with pytest.raises(RuntimeError):
        save_bundle(synthetic(9), path, overwrite=True)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.trx"]


def test_format_override_and_name(tmp_path):
    path = save_bundle(synthetic(4), tmp_path / "x.dat", format=".TCK")
    assert sniff_format(path) == "tck"
    b = load_bundle(save_bundle(synthetic(4), tmp_path / "sub-01__IFOF_R.trk"))
    assert b.name == "sub-01__IFOF_R"
    assert load_bundle(tmp_path / "sub-01__IFOF_R.trk", name="IFOF_R").name == "IFOF_R"


def test_load_bundle_bytes_removes_its_temp_file(tmp_path, monkeypatch, trk_file):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    b = load_bundle_bytes(trk_file.read_bytes(), format="TRK", name="IFOF_R")
    assert len(b) == 20 and b.name == "IFOF_R" and b.source_format == "trk"
    msg = expect("truncated", load_bundle_bytes, trk_file.read_bytes()[:-10], format="trk", name="IFOF_R")
    assert msg.startswith("IFOF_R: ") and "vqdiff-upload" not in msg
    expect("missing_reference", load_bundle_bytes, bundle_to_bytes(b, format="tck"), format="tck")
    assert list(scratch.iterdir()) == []


def test_sniff_format(tmp_path, trk_file):
    assert sniff_format(trk_file) == "trk" and sniff_format(str(trk_file)) == "trk"
    assert sniff_format(b"mrtrix tracks\ncount: 1\n") == "tck"
    assert sniff_format(memoryview(b"PK\x03\x04rest")) == "trx"
    assert sniff_format(bytearray(b"TRACK")) == "trk"
    for junk in (PNG, b"", b"TRAC", b"PK\x05\x06"):
        assert sniff_format(junk) is None


def test_import_is_light():
    code = "import sys, vqdiff.io; assert 'trx' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trk_affine_is_the_float64_einsum_bit_for_bit():
    from vqdiff.geometry import map_points as apply_affine

    rng = np.random.default_rng(5)
    records = (rng.normal(size=(300, 37, 4)) * 60).astype(np.float32)  # 37 points + 1 scalar per record
    pts = records[..., :3]  # strided, as read_trk passes them
    general = np.eye(4)
    general[:3] = rng.normal(size=(3, 4)) * [1, 1, 1, 90]
    shift = np.diag([-2.0, -2.0, 2.0, 1.0])
    shift[:3, 3] = [90, 126, -72]
    for affine in (general, shift):
        flat = np.ascontiguousarray(pts).reshape(-1, 3).astype(np.float64)
        ref = (np.einsum("pj,ij->pi", flat, affine[:3, :3]) + affine[:3, 3]).astype(np.float32)
        np.testing.assert_array_equal(apply_affine(pts, affine), ref)


def test_package_exports():
    import vqdiff.io

    assert set(vqdiff.io.__all__) == {"load_bundle", "save_bundle", "load_bundle_bytes", "bundle_to_bytes",
                                      "sniff_format", "file_order_groups", "read_whole"}
    assert all(callable(getattr(vqdiff.io, name)) for name in vqdiff.io.__all__)


def test_read_whole_names_the_formats_parsed_from_their_bytes(tmp_path):
    from vqdiff.io import read_whole

    assert [read_whole(f"b{s}") for s in (".trk", ".TCK", ".trx", ".TRX", ".vqlat", "")] == \
        [True, True, False, False, False, False]
    # a bundle handed over as bytes is parsed from them, by the same rule (a TRX is read from its path)
    src = tmp_path / "a.trk"
    save_bundle(Bundle([np.ones((3, 3), np.float32).cumsum(0), np.ones((4, 3), np.float32).cumsum(0)],
                       SpatialHeader.identity(), source_format="memory", name="a"), src)
    other = tmp_path / "b.trk"
    save_bundle(Bundle([np.ones((5, 3), np.float32).cumsum(0)], SpatialHeader.identity(), source_format="memory",
                       name="b"), other)
    assert len(load_bundle(src, data=other.read_bytes())) == 1


# ---------------------------------------------------------------------------------------------- hardening
def _small_bundle() -> Bundle:
    rng = np.random.default_rng(3)
    lines = [np.cumsum(rng.normal(size=(12, 3)), 0).astype(np.float32) for _ in range(5)]
    return Bundle(lines, SpatialHeader.identity(), "memory", "small")


def _trx_with(members: dict[str, bytes], header: dict, compression=zipfile.ZIP_DEFLATED) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        zf.writestr("header.json", json.dumps(header))
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


TRX_HEADER = {"VOXEL_TO_RASMM": np.eye(4).tolist(), "DIMENSIONS": [10, 10, 10], "NB_VERTICES": 2, "NB_STREAMLINES": 1}


def test_trx_bomb_is_refused_before_inflating():
    """A small archive whose positions member would inflate to 64 MiB, under a header declaring 2 points:
    refused from the zip directory (no inflation); a header declaring more than the limits: refused too."""
    import time

    bomb = _trx_with({"positions.3.float32": bytes(64 << 20), "offsets.uint64": np.array([0, 2], "<u8").tobytes()},
                     TRX_HEADER)
    assert len(bomb) < 200_000
    t0 = time.perf_counter()
    with pytest.raises(BundleFormatError) as e:
        load_bundle_bytes(bomb, format="trx")
    assert e.value.reason == "count_mismatch" and "inflate" in str(e.value)
    assert time.perf_counter() - t0 < 1.0
    honest = _trx_with({"positions.3.float32": bytes(12 * (1 << 20)),
                        "offsets.uint64": np.array([0, 1 << 20], "<u8").tobytes()},
                       {**TRX_HEADER, "NB_VERTICES": 1 << 20})
    with pytest.raises(BundleFormatError) as e:
        load_bundle_bytes(honest, format="trx", max_points=100_000)
    assert e.value.reason == "too_many_points"
    with pytest.raises(BundleFormatError) as e:
        load_bundle_bytes(honest, format="trx", max_streamlines=0)
    assert e.value.reason == "too_many_streamlines"


def test_foreign_reader_exceptions_become_our_error():
    """Whatever nibabel or zipfile raise on a corrupt file ends in BundleFormatError with its message."""
    trx = bundle_to_bytes(_small_bundle(), format="trx")
    # an unsupported compression method in the central directory (zipfile: NotImplementedError)
    cd = trx.rindex(b"PK\x01\x02")
    bad = trx[:cd + 10] + struct.pack("<H", 99) + trx[cd + 12:]
    with pytest.raises(BundleFormatError) as e:
        load_bundle_bytes(bad, format="trx")
    assert e.value.reason == "unreadable"
    # a TRK whose voxel_order field is corrupt (nibabel: ValueError outside the header parse)
    trk = bytearray(bundle_to_bytes(_small_bundle(), format="trk"))
    at = header_2_dtype.fields["voxel_order"][1]
    trk[at:at + 3] = b"XYZ"
    with pytest.raises(BundleFormatError) as e:
        load_bundle_bytes(bytes(trk), format="trk")
    assert e.value.reason in ("unreadable", "bad_reference")
