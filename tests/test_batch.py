"""Batch encoding / decoding (vqdiff.batch: tasks, stages, local and Ray runners, the job and its CLIs).

Trees of several subjects are built in tmp_path from symlinks to ../shared/data/subject01 plus a
synthetic bundle (a streamline count that is no multiple of 64, varied point counts); the model is
a small random-weight checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vqdiff.batch import job, model, stages
from vqdiff.batch import tasks as bt
from vqdiff.batch.cli_decode import main as decode_main
from vqdiff.batch.cli_encode import main as encode_main
from vqdiff.bundle import Bundle, SpatialHeader
from vqdiff.checkpoint import save_checkpoint
from vqdiff.codec import Codec
from vqdiff.fileio import file_sha256
from vqdiff.io import load_bundle, save_bundle
from vqdiff.latents import Latents
from vqdiff.models import ModelConfig, StreamlineAutoencoder
from vqdiff.normalise import Normalisation

SMALL = ("ILF_R", "POPT_R", "PYT_R")  # the smallest real bundles: 256, 192, 320 streamlines


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.for_kind("vq_diff", hidden=32, residual_hidden=8, embedding_dim=16, bottleneck={"num_codes": 32})
    model = StreamlineAutoencoder.from_config(cfg).eval()
    norm = Normalisation.fit(np.array([[-80.0, -120, -60], [80, 80, 90]]))
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny", model, norm)


@pytest.fixture(scope="module")
def odd_bundle(subject_dir, tmp_path_factory) -> Path:
    """100 streamlines (no multiple of 64) of 20..90 points, in the space of the real data."""
    from dipy.tracking.streamline import set_number_of_points

    src = load_bundle(subject_dir / "ILF_R.trk")
    counts = np.random.default_rng(1).integers(20, 90, 100)
    sl = [set_number_of_points(np.ascontiguousarray(s), nb_points=int(k)) for s, k in zip(src.streamlines[:100], counts, strict=True)]
    return save_bundle(Bundle(sl, src.header), tmp_path_factory.mktemp("odd") / "ODD.trk")


def make_tree(root: Path, subject_dir: Path, subjects: int, bundles=SMALL, odd: Path | None = None) -> Path:
    """TractoInferno layout: root/sub-0k/tractography/sub-0k__B.trk (symlinks)."""
    for s in range(1, subjects + 1):
        d = root / f"sub-0{s}" / "tractography"
        d.mkdir(parents=True)
        for b in bundles:
            (d / f"sub-0{s}__{b}.trk").symlink_to(subject_dir / f"{b}.trk")
        if odd is not None:
            (d / f"sub-0{s}__ODD.trk").symlink_to(odd)
    return root


def run_cli(main, *args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args] + ["--no-progress"])
    return exc.value.code


def tree_bytes(out: Path, pattern: str = "*.vqlat") -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob(pattern))}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def index(out: Path, name: str = "index.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


# ------------------------------------------------------------------------------------------ units
def test_shard_parse_and_partition():
    assert bt.parse_shard("2/4") == (2, 4) and bt.parse_shard("0/1") == (0, 1)
    for bad in ("4/4", "1/0", "-1/3", "a/b", "3"):
        with pytest.raises(bt.BatchError, match="0 <= K < N"):
            bt.parse_shard(bad)
    tasks = [bt.BatchTask(f"/i/{c}", c, "s", c, f"/o/{c}", c) for c in "qwertyuiop"]
    shards = [bt.shard_tasks(tasks, k, 3) for k in range(3)]
    assert sorted(t.rel for s in shards for t in s) == sorted("qwertyuiop")
    assert shards == [bt.shard_tasks(list(reversed(tasks)), k, 3) for k in range(3)]  # order-independent
    more = tasks + [bt.BatchTask(f"/i/{c}", c, "s", c, f"/o/{c}", c) for c in "asdfgh"]  # files added later
    for k in range(3):  # ... never move the others to another shard
        assert {t.rel for t in shards[k]} <= {t.rel for t in bt.shard_tasks(more, k, 3)}
    assert all(shards)  # the hash spreads ten names over three shards


def test_batcher_runs_full_batches_only():
    calls = []

    def run(x):
        calls.append(len(x))
        return (x * 2.0,)

    b = stages.Batcher(run, 8)
    arrays = {k: np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * k for k, n in enumerate([3, 11, 1, 6])}
    done = [kv for k, x in arrays.items() for kv in b.add(k, x)] + b.flush()
    assert set(calls) == {8} and len(calls) == 3  # 21 groups -> 3 calls of exactly 8 (last one padded)
    assert [k for k, _ in done] == [0, 1, 2, 3]
    for k, (out,) in done:
        np.testing.assert_array_equal(out, arrays[k] * 2.0)


def test_ray_is_optional(monkeypatch):
    from vqdiff.batch import ray_runner

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(bt.BatchError, match=r"pip install 'vqdiff\[ray\]'"):
        ray_runner.import_ray()


def test_latents_bytes_are_canonical(ckpt):
    codec = Codec.from_checkpoint(ckpt)
    lat = codec.encode(Bundle([np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)] * 3,
                              SpatialHeader.identity()))
    data = lat.to_bytes()
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0 and list(json.loads(data[8:8 + n])["__metadata__"]) == sorted(lat._metadata())
    back = Latents.from_bytes(data)
    assert np.array_equal(back.latents, lat.latents) and back.model == lat.model
    assert back.to_bytes() == data


def test_help():
    for main in (encode_main, decode_main):
        assert run_cli(main, "--help") == 0


# ------------------------------------------------------------------------------------------ jobs
def test_encode_decode_round_trip_and_resume(subject_dir, ckpt, odd_bundle, tmp_path, capsys):
    """Subject01 laid out as 2 subjects (+ an odd bundle): every streamline of every file comes back."""
    tree = make_tree(tmp_path / "in", subject_dir, 2, bundles=[p.stem for p in sorted(subject_dir.glob("*.trk"))],
                     odd=odd_bundle)
    inputs = sorted(tree.rglob("*.trk"))
    lat_dir, rec_dir = tmp_path / "latents", tmp_path / "recon"
    assert run_cli(encode_main, tree, lat_dir, "--model", ckpt) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["done"] == len(inputs) == 26 and summary["failed"] == 0
    rows = index(lat_dir)
    assert [r["input"] for r in rows] == sorted(p.relative_to(tree).as_posix() for p in inputs)
    assert {r["output"] for r in rows} == {f"sub-0{s}/{p.stem}.vqlat" for s in (1, 2) for p in
                                           [*subject_dir.glob("*.trk"), odd_bundle]}
    # the batch (files concatenated into fixed batches) matches the one-file API
    codec = Codec.from_checkpoint(ckpt)
    for subj, name in (("sub-01", "ODD"), ("sub-02", "IFOF_R")):
        lat = Latents.load(lat_dir / subj / f"{name}.vqlat")
        src = tree / subj / "tractography" / f"{subj}__{name}.trk"
        ref = codec.encode(load_bundle(src))
        np.testing.assert_allclose(lat.latents, ref.latents, rtol=0, atol=1e-5)
        assert np.array_equal(lat.order, ref.order) and np.array_equal(lat.flipped, ref.flipped)
        assert lat.source["input_sha256"] == file_sha256(src)

    assert run_cli(decode_main, lat_dir, rec_dir, "--model", ckpt) == 0
    assert json.loads(capsys.readouterr().out)["done"] == len(inputs)
    for row in rows:
        src = load_bundle(tree / row["input"])
        out = load_bundle(rec_dir / row["output"].replace(".vqlat", ".trk"))
        assert len(out) == len(src) == row["streamlines"]
        assert [len(s) for s in out.streamlines] == [len(s) for s in src.streamlines]
        np.testing.assert_allclose(out.header.affine, src.header.affine)
        assert out.header.dimensions == src.header.dimensions

    # second runs: nothing to do, nothing rewritten, and they say so
    mtimes = {p: p.stat().st_mtime_ns for p in [*lat_dir.rglob("*.vqlat"), *rec_dir.rglob("*.trk")]}
    before = tree_bytes(lat_dir, "index.jsonl")
    assert run_cli(encode_main, tree, lat_dir, "--model", ckpt) == 0
    again = capsys.readouterr()
    assert json.loads(again.out)["skipped"] == len(inputs) and "nothing to do" in again.err
    assert run_cli(decode_main, lat_dir, rec_dir, "--model", ckpt) == 0
    again = capsys.readouterr()
    assert json.loads(again.out)["done"] == 0 and "nothing to do" in again.err
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert tree_bytes(lat_dir, "index.jsonl") == before
    assert not leftovers(lat_dir) and not leftovers(rec_dir)


def test_shards_flat_layout_and_batch_independence(subject_dir, ckpt, odd_bundle, tmp_path):
    """Flat folders; K/N shards partition the files; a file's bytes do not depend on its batch mates."""
    flat = tmp_path / "flat"
    for subj in ("alice", "bob"):
        (flat / subj).mkdir(parents=True)
        for b in SMALL:
            (flat / subj / f"{b}.trk").symlink_to(subject_dir / f"{b}.trk")
        (flat / subj / "ODD.trk").symlink_to(odd_bundle)
    full = job.run_batch("encode", flat, tmp_path / "full", model=ckpt, progress=False)
    assert full["done"] == 8
    sharded = tmp_path / "sharded"
    parts = [job.run_batch("encode", flat, sharded, model=ckpt, shard=(k, 3), progress=False, workers=1)
             for k in range(3)]
    assert sum(p["files"] for p in parts) == 8 and all(p["files"] for p in parts)  # a partition (by path hash)
    assert sorted(r["input"] for k in range(3) for r in index(sharded, f"index.shard-{k}-of-3.jsonl")) == \
        sorted(r["input"] for r in index(tmp_path / "full"))
    assert tree_bytes(sharded) == tree_bytes(tmp_path / "full")  # other batch mates, same bytes
    assert set(tree_bytes(sharded)) == {f"{s}/{b}.vqlat" for s in ("alice", "bob") for b in (*SMALL, "ODD")}
    # after the shards, one unsharded run finds everything done and writes the whole index
    whole = job.run_batch("encode", flat, sharded, model=ckpt, progress=False)
    assert whole["skipped"] == 8 and index(sharded) == index(tmp_path / "full")


def test_bad_files_are_reported_and_skipped(subject_dir, ckpt, tmp_path, capsys):
    tree = make_tree(tmp_path / "in", subject_dir, 1)
    bad = tree / "sub-01" / "tractography"
    (bad / "sub-01__CUT.trk").write_bytes((subject_dir / "ILF_R.trk").read_bytes()[:5000])
    (bad / "sub-01__EMPTY.trk").write_bytes(b"")
    (bad / "sub-01__TCK.trk").write_bytes(b"mrtrix tracks\nEND\n")
    out = tmp_path / "out"
    assert run_cli(encode_main, tree, out, "--model", ckpt) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["done"] == 3 and summary["failed"] == 3
    reasons = {f["input"].split("__")[1]: f["reason"] for f in summary["failures"]}
    assert reasons == {"CUT.trk": "truncated", "EMPTY.trk": "empty", "TCK.trk": "wrong_magic"}
    assert "sub-01__CUT.trk" in captured.err and "file ends inside streamline" in captured.err
    rows = {r["input"].split("__")[1]: r for r in index(out)}
    assert rows["CUT.trk"]["status"] == "failed" and "expected a complete TrackVis" in rows["CUT.trk"]["error"]
    assert rows["ILF_R.trk"]["status"] == "ok"
    assert sorted(p.name for p in out.rglob("*.vqlat")) == sorted(f"{b}.vqlat" for b in SMALL)
    # a changed input: its output is stale, refused without -f, replaced with -f
    link = bad / "sub-01__ILF_R.trk"
    link.unlink()
    link.symlink_to(subject_dir / "POPT_L.trk")
    assert run_cli(encode_main, tree, out, "--model", ckpt) == 1
    assert "use -f to replace it" in capsys.readouterr().err
    assert run_cli(encode_main, tree, out, "--model", ckpt, "-f") == 1  # the 3 bad files still fail
    assert Latents.load(out / "sub-01" / "ILF_R.vqlat").n_streamlines == 320


@pytest.mark.parametrize("fmt", ["trx", "tck"])
def test_decode_formats(subject_dir, ckpt, odd_bundle, tmp_path, fmt):
    tree = make_tree(tmp_path / "in", subject_dir, 1, bundles=("POPT_R",), odd=odd_bundle)
    job.run_batch("encode", tree, tmp_path / "lat", model=ckpt, progress=False)
    s = job.run_batch("decode", tmp_path / "lat", tmp_path / "rec", model=ckpt, format=fmt, progress=False,
                     restore_points=False)
    assert s["done"] == 2
    odd = load_bundle(tmp_path / "rec" / "sub-01" / f"ODD.{fmt}", reference=odd_bundle)
    assert len(odd) == 100 and {len(x) for x in odd.streamlines} == {64}


def test_crash_mid_run_then_resume_is_byte_identical(subject_dir, ckpt, odd_bundle, tmp_path):
    tree = make_tree(tmp_path / "in", subject_dir, 2, odd=odd_bundle)  # 8 files
    ref = tmp_path / "ref"
    job.run_batch("encode", tree, ref, model=ckpt, progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vqdiff.batch.cli_encode", str(tree), str(out), "--model", str(ckpt),
           "--no-progress"]
    env = {**os.environ, "VQDIFF_BATCH_THROTTLE": "0.5"}  # each written file then waits: the kill lands mid-run
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.rglob("*.vqlat")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = list(out.rglob("*.vqlat"))
    assert 1 <= len(written) < 8, "the kill did not land mid-run"
    # what a kill in the middle of a write leaves: a temp file, and a torn line at the end of the index
    (out / "sub-02").mkdir(exist_ok=True)
    (out / "sub-02" / ".ILF_R.vqlat.tmp-4242-1").write_bytes(b"partial")
    with open(out / "index.jsonl", "a") as f:
        f.write('{"subject": "sub-02", "bund')

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["skipped"] == len(written) and summary["done"] == 8 - len(written)
    assert tree_bytes(out) == tree_bytes(ref)
    assert (out / "index.jsonl").read_bytes() == (ref / "index.jsonl").read_bytes()
    assert not leftovers(out)


def test_ray_matches_local(subject_dir, ckpt, odd_bundle, tmp_path):
    pytest.importorskip("ray.data", reason="Ray is optional: pip install 'vqdiff[ray]' to run the Ray test")
    tree = make_tree(tmp_path / "in", subject_dir, 2, odd=odd_bundle)
    local = job.run_batch("encode", tree, tmp_path / "local", model=ckpt, progress=False)
    cmd = [sys.executable, "-m", "vqdiff.batch.cli_encode", str(tree), str(tmp_path / "ray"),
           "--model", str(ckpt), "--ray", "local", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["mode"] == "ray (local)" and summary["done"] == local["done"] == 8
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "local")  # byte-identical latents
    assert index(tmp_path / "ray") == index(tmp_path / "local")
    assert not leftovers(tmp_path / "ray")


def test_worker_processes_write_the_same_bytes_as_threads(subject_dir, ckpt, odd_bundle, tmp_path):
    tree = make_tree(tmp_path / "in", subject_dir, 2, odd=odd_bundle)
    threads = job.run_batch("encode", tree, tmp_path / "threads", model=ckpt, progress=False)
    procs = job.run_batch("encode", tree, tmp_path / "procs", model=ckpt, workers=2, processes=True, progress=False)
    assert (threads["prepare"], procs["prepare"]) == ("2 threads", "2 processes")
    assert procs["done"] == threads["done"] == 8 and not procs["failures"]
    assert tree_bytes(tmp_path / "procs") == tree_bytes(tmp_path / "threads")  # byte-identical latents
    assert index(tmp_path / "procs") == index(tmp_path / "threads")
    again = job.run_batch("encode", tree, tmp_path / "procs", model=ckpt, processes=True, progress=False)
    assert again["skipped"] == 8 and again["done"] == 0  # resume reads the outputs the processes wrote


def test_prepare_look_ahead_is_bounded_by_files_and_bytes(subject_dir, ckpt, odd_bundle, tmp_path, monkeypatch):
    from vqdiff.batch import local

    tree = make_tree(tmp_path / "in", subject_dir, 3, odd=odd_bundle)  # 12 files
    ahead, real_pool = [], local.prepare_pool

    def counting_pool(spec, workers, processes):
        pool, submit = real_pool(spec, workers, processes)
        futures = []

        def counted(task):
            futures.append(submit(task))
            ahead.append(sum(not f.done() for f in futures))  # submitted and not yet prepared, a new one included
            return futures[-1]

        return pool, counted

    monkeypatch.setattr(local, "prepare_pool", counting_pool)
    deep = job.run_batch("encode", tree, tmp_path / "deep", model=ckpt, progress=False)
    assert deep["done"] == 12 and len(ahead) == 12 and 2 < max(ahead) <= local.PREFETCH_FILES
    ahead.clear()
    monkeypatch.setattr(local, "PREFETCH_BYTES", 1)  # any file is over it: only `workers` files ahead
    shallow = job.run_batch("encode", tree, tmp_path / "shallow", model=ckpt, workers=2, progress=False)
    assert shallow["done"] == 12 and max(ahead) <= 2
    assert tree_bytes(tmp_path / "shallow") == tree_bytes(tmp_path / "deep")  # the look-ahead changes no byte


def test_a_dead_worker_process_stops_the_job_with_a_clear_error(subject_dir, ckpt, tmp_path, monkeypatch):
    from concurrent.futures import Future, ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from vqdiff.batch import local

    def broken_pool(spec, workers, processes):
        def submit(task):
            fut = Future()
            fut.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            return fut
        return ThreadPoolExecutor(1), submit

    monkeypatch.setattr(local, "prepare_pool", broken_pool)
    tree = make_tree(tmp_path / "in", subject_dir, 1, bundles=("POPT_R",))
    with pytest.raises(bt.BatchError, match="worker process died while .*POPT_R.*run the job again to resume"):
        job.run_batch("encode", tree, tmp_path / "out", model=ckpt, processes=True, progress=False)


def test_worker_processes_fall_back_to_threads_for_a_script_read_from_stdin(monkeypatch, caplog):
    from types import SimpleNamespace

    from vqdiff.batch import local

    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__file__="/nonexistent/<stdin>"))
    spec = stages.JobSpec("encode", "m", {}, {})
    pool, _ = local.prepare_pool(spec, 1, processes=True)
    pool.shutdown()
    assert type(pool).__name__ == "ThreadPoolExecutor" and "stdin" in caplog.text


def test_load_codec_opens_checkpoints_on_torch_and_names_what_is_missing(ckpt):
    x = np.random.default_rng(0).normal(size=(16, 3, 64, 64)).astype(np.float32)
    codec = model.load_codec(ckpt)
    ref = Codec.from_checkpoint(ckpt)
    assert codec.model_info == ref.model_info and codec.engine.backend == "torch"
    np.testing.assert_array_equal(stages.engine_call(codec, "encode", x)[0], stages.engine_call(ref, "encode", x)[0])
    with pytest.raises(bt.BatchError, match="needs an export directory"):
        model.load_codec(ckpt, backend="ort-cpu")


def test_any_reader_failure_skips_the_file_not_the_run(subject_dir, ckpt, tmp_path, monkeypatch):
    """Whatever a reader raises on a corrupt file (nibabel, zipfile, numpy...), batch encoding reports the
    file, goes on with the others and ends with the failure listed; a rerun retries only that file."""
    import vqdiff.io

    tree = make_tree(tmp_path / "in", subject_dir, 1, bundles=("POPT_R", "PYT_R"))
    real = vqdiff.io.load_bundle

    def flaky(path, **kw):
        if "POPT_R" in str(path):
            raise RuntimeError("File is encrypted, password required for extraction")  # zipfile's
        return real(path, **kw)

    monkeypatch.setattr(vqdiff.io, "load_bundle", flaky)
    s = job.run_batch("encode", tree, tmp_path / "lat", model=ckpt, progress=False)
    assert (s["done"], s["failed"]) == (1, 1) and s["failures"][0]["reason"] == "RuntimeError"
    assert "encrypted" in s["failures"][0]["error"]
    monkeypatch.setattr(vqdiff.io, "load_bundle", real)
    s = job.run_batch("encode", tree, tmp_path / "lat", model=ckpt, progress=False)
    assert (s["done"], s["skipped"], s["failed"]) == (1, 1, 0)


def test_decode_refuses_latents_of_another_model(subject_dir, ckpt, tmp_path):
    tree = make_tree(tmp_path / "in", subject_dir, 1, bundles=("POPT_R",))
    job.run_batch("encode", tree, tmp_path / "lat", model=ckpt, progress=False)
    other = StreamlineAutoencoder.from_config(
        ModelConfig.for_kind("vq_diff", hidden=32, residual_hidden=8, embedding_dim=16, bottleneck={"num_codes": 32}))
    other_dir = save_checkpoint(tmp_path / "other", other.eval(), Normalisation.identity())
    s = job.run_batch("decode", tmp_path / "lat", tmp_path / "rec", model=other_dir, progress=False)
    assert s["failed"] == 1 and s["failures"][0]["reason"] == "ModelMismatchError"
    assert "decode them with that model" in s["failures"][0]["error"] and not list((tmp_path / "rec").rglob("*.trk"))


def test_provenance_is_recorded_and_a_changed_engine_is_not_mixed_in(subject_dir, ckpt, tmp_path):
    """Latents record the engine and versions; rerunning with another engine variant does not skip the
    outputs of the first (it refuses without -f instead of silently mixing a dataset)."""
    from dataclasses import replace

    tree = make_tree(tmp_path / "in", subject_dir, 1, bundles=("POPT_R",))
    job.run_batch("encode", tree, tmp_path / "lat", model=ckpt, progress=False)
    lat = Latents.load(tmp_path / "lat" / "sub-01" / "POPT_R.vqlat")
    assert lat.provenance["engine"] == {"backend": "torch", "variant": "fp32", "engine": "torch-fp32"}
    assert lat.provenance["vqdiff"] and lat.provenance["canonicalisation"] == 1
    codec = model.load_codec(ckpt)
    spec = stages.JobSpec("encode", str(ckpt), dict(codec.model_info), codec.normalisation.to_dict(),
                          engine=dict(codec.pipeline.provenance["engine"]))
    task = bt.encode_tasks(tree, tmp_path / "lat")[0]
    assert stages.prepare(spec, task)[1] == "skipped"  # same engine: up to date
    other = replace(spec, engine={"backend": "onnxruntime", "variant": "int8"})
    rec, outcome = stages.prepare(other, task)
    assert outcome == "failed" and "was made by" in rec["error"] and "-f" in rec["error"]
