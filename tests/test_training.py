"""Training CLIs: --help, tiny real runs on two real bundles, exact resume, DDP with gloo."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from vqdiff.checkpoint import load_checkpoint

TINY_MODEL = json.dumps({"hidden": 16, "residual_hidden": 8, "embedding_dim": 8})
TINY_CODES = json.dumps({"num_codes": 16})


def _run(module, *args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("module", ["vqdiff.training.cli_prepare", "vqdiff.training.cli_train",
                                    "vqdiff.cli.roundtrip"])
def test_help(module):
    out = _run(module, "--help").stdout
    assert "usage" in out and "Example" in out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, subject_dir):
    src = tmp_path_factory.mktemp("src")
    for name in ("PYT_R", "POPT_R"):  # 320 + 192 streamlines: 5 + 3 groups
        (src / f"{name}.trk").symlink_to(subject_dir / f"{name}.trk")
    out = tmp_path_factory.mktemp("data") / "ds"
    proc = _run("vqdiff.training.cli_prepare", src, out, "--seed", "3")
    summary = json.loads(proc.stdout)
    assert summary["bundles"] == ["POPT_R", "PYT_R"] and summary["streamlines"] == 512
    assert summary["split_by"] == "group" and summary["val_groups"] == 2  # one per bundle
    return out


def test_prepare_manifest_and_shards(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert len(manifest["sha256"]) == 64 and manifest["seed"] == 3
    for e in manifest["shards"]:
        assert len(e["source_sha256"]) == 64
        t = load_file(str(dataset / e["shard"]))
        assert t["streamlines"].shape == (e["streamlines"], 64, 3)
        assert t["split"].sum() > 0 and (t["split"] == 0).sum() == e["train_streamlines"]
        # a validation group is whole: all its streamlines share the split flag
        for g in np.unique(t["group"]):
            assert len(np.unique(t["split"][t["group"] == g])) == 1


def test_prepare_refuses_existing_output(dataset, subject_dir):
    proc = _run("vqdiff.training.cli_prepare", subject_dir, dataset, check=False)
    assert proc.returncode == 2 and "use -f" in proc.stderr


def test_prepare_splits_by_subject(tmp_path, subject_dir):
    from vqdiff.training.data import find_bundle_files, prepare_dataset

    for sub in ("sub-1001", "sub-1002", "sub-1003"):
        d = tmp_path / "in" / sub / "tractography"
        d.mkdir(parents=True)
        (d / f"{sub}__POPT_R.trk").symlink_to(subject_dir / "POPT_R.trk")
    files = find_bundle_files(tmp_path / "in")
    assert [(f.subject, f.bundle) for f in files] == [(s, "POPT_R") for s in ("sub-1001", "sub-1002", "sub-1003")]
    m = prepare_dataset(tmp_path / "in", tmp_path / "out", val_fraction=0.34, seed=0)
    assert m["split_by"] == "subject" and len(m["val_subjects"]) == 1
    for e in m["shards"]:
        assert e["val_groups"] in (0, e["groups"])


def _train(dataset, out, *extra):
    return _run("vqdiff.training.cli_train", dataset, out, "--model", TINY_MODEL, "--bottleneck", TINY_CODES,
                "--batch-size", "4", "--threads", "1", "--no-progress", *extra)


@pytest.mark.parametrize("kind", ["ae", "vae", "vq", "vq_ema", "vq_diff"])
def test_train_every_kind_tiny(dataset, tmp_path, kind):
    codes = [] if kind in ("ae", "vae") else ["--bottleneck", TINY_CODES]
    proc = _run("vqdiff.training.cli_train", dataset, tmp_path / kind, "--kind", kind, "--model", TINY_MODEL,
                *codes, "--steps", "3", "--eval-every", "3", "--batch-size", "4", "--threads", "1", "--no-progress")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["step"] == 3 and 0 <= result["val_buan"] <= 1 and result["val_mdf"] > 0
    ck = load_checkpoint(tmp_path / kind / "last")
    assert ck.model.kind == kind and ck.info["training"]["steps_done"] == 3
    assert (tmp_path / kind / "best" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (tmp_path / kind / "log.jsonl").read_text().splitlines()]
    assert any("val_mse" in x for x in lines)


def test_resume_is_exact(dataset, tmp_path):
    _train(dataset, tmp_path / "straight", "--steps", "6", "--eval-every", "6")
    _train(dataset, tmp_path / "resumed", "--steps", "6", "--eval-every", "3", "--time-limit", "0")
    first = load_checkpoint(tmp_path / "resumed" / "last")
    assert first.info["training"]["steps_done"] == 1  # the zero time limit stops after one step
    _train(dataset, tmp_path / "resumed", "--steps", "6", "--eval-every", "3")
    a = load_checkpoint(tmp_path / "straight" / "last").model.state_dict()
    b = load_checkpoint(tmp_path / "resumed" / "last").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_training_state_is_atomic_with_the_checkpoint_and_never_silently_restarted(dataset, tmp_path):
    """The resume state and the templates are inside last/ (written in the same swap as the weights); a
    run folder whose last/ cannot be resumed is refused, and --fresh says so on purpose."""
    import shutil

    out = tmp_path / "run"
    _train(dataset, out, "--steps", "2", "--eval-every", "2")
    assert {"train_state.pt", "templates.safetensors", "model.safetensors"} <= {p.name for p in (out / "last").iterdir()}
    assert (out / "best" / "templates.safetensors").is_file()
    from vqdiff.templates import Templates

    assert Templates.load(out / "last" / "templates.safetensors").names  # the training bundles
    (out / "last" / "train_state.pt").unlink()  # as a kill between two writes would have left it before
    proc = subprocess.run([sys.executable, "-m", "vqdiff.training.cli_train", str(dataset), str(out), "--model",
                           TINY_MODEL, "--bottleneck", TINY_CODES, "--batch-size", "4", "--threads", "1",
                           "--no-progress", "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--fresh" in proc.stderr and "no resumable state" in proc.stderr
    best = (out / "best" / "model.safetensors").read_bytes()
    _train(dataset, out, "--steps", "2", "--eval-every", "2", "--fresh")
    assert (out / "last" / "train_state.pt").is_file() and best  # restarted on purpose
    shutil.rmtree(out)


def _ddp(dataset, out, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "vqdiff.training.cli_train", str(dataset), str(out), "--model", TINY_MODEL,
         "--bottleneck", TINY_CODES, "--batch-size", "2", "--threads", "1", "--no-progress", "--device", "cpu",
         *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ddp_two_gloo_processes(dataset, tmp_path):
    _ddp(dataset, tmp_path / "ddp", "--steps", "3", "--eval-every", "3")
    ck = load_checkpoint(tmp_path / "ddp" / "last")
    assert ck.info["training"]["world_size"] == 2 and ck.info["training"]["steps_done"] == 3
    state = torch.load(tmp_path / "ddp" / "last" / "train_state.pt", weights_only=True)
    assert len(state["ranks"]) == 2 and state["ranks"][0]["sampler_rng"] != state["ranks"][1]["sampler_rng"]


def test_ddp_resume_is_exact_per_rank(dataset, tmp_path):
    """Each rank restores its own sampler and RNG state, and the time limit stops every rank at once."""
    _ddp(dataset, tmp_path / "straight", "--steps", "4", "--eval-every", "4")
    _ddp(dataset, tmp_path / "resumed", "--steps", "4", "--eval-every", "4", "--time-limit", "0")
    assert load_checkpoint(tmp_path / "resumed" / "last").info["training"]["steps_done"] == 1
    _ddp(dataset, tmp_path / "resumed", "--steps", "4", "--eval-every", "4")
    a = load_checkpoint(tmp_path / "straight" / "last").model.state_dict()
    b = load_checkpoint(tmp_path / "resumed" / "last").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after a DDP resume")


def test_evaluate_outputs_present_and_sane(dataset, tmp_path, subject_dir):
    _train(dataset, tmp_path / "run", "--steps", "2", "--eval-every", "2")
    paper = subject_dir.parent / "paper_buan_table.csv"
    proc = _run("vqdiff.training.cli_evaluate", tmp_path / "run" / "last", dataset, tmp_path / "eval",
                "--paper-table", paper, "--directions", "1")
    printed = json.loads(proc.stdout)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert printed["buan_mean"] == metrics["buan_mean"] and 0 <= metrics["buan_mean"] <= 1
    assert set(metrics["per_bundle"]) == {"POPT_R", "PYT_R"} and metrics["groups"] == 2
    assert metrics["mdf_mm"] > 0 and metrics["pointwise_mm"] >= metrics["mdf_mm"] - 1e-9
    rob = metrics["robustness"]
    assert rob["buan"][0] == pytest.approx(1.0) and 0 <= rob["auc"] <= 1
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| PYT_R |" in table and "0.998822 ± 0.003826" in table  # the paper's VQ-Diff PYT_R entry
    for png in ("reconstructions.png", "latent_tsne.png", "perturbation.png"):
        data = (tmp_path / "eval" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    # the five-kind table picks up <kind>-eval folders
    from vqdiff.training.table1 import build_table

    (tmp_path / "runs").mkdir()
    (tmp_path / "eval").rename(tmp_path / "runs" / "vq_diff-eval")
    md = build_table(tmp_path / "runs", paper)
    assert "| PYT_R | " in md and "0.998822 ± 0.003826" in md and "| vq_diff | " in md
