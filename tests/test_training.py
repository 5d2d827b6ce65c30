"""Training CLIs: --help, tiny real runs on two real bundles, splits (train / validation / test), exact
resume (with augmentations, and of fine-tuning runs), fine-tuning, early stopping, DDP with gloo."""

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


AUG_FLAGS = ("--rotate-deg", "15", "--scale-range", "0.9", "1.1", "--aniso-scale", "0.05", "--shear", "0.05",
             "--translate-mm", "5", "--mirror-prob", "0.5", "--elastic-mm", "3", "--jitter-mm", "0.3")


@pytest.mark.parametrize("module", ["vqdiff.training.cli_prepare", "vqdiff.training.cli_train",
                                    "vqdiff.training.cli_evaluate", "vqdiff.cli.roundtrip"])
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
    assert summary["test_fraction"] == 0.1 and summary["test_groups"] == 2  # the default: one per bundle
    assert summary["train_streamlines"] == 512 - 4 * 64
    return out


def test_prepare_manifest_and_shards(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert len(manifest["sha256"]) == 64 and manifest["seed"] == 3
    for e in manifest["shards"]:
        assert len(e["source_sha256"]) == 64
        t = load_file(str(dataset / e["shard"]))
        assert t["streamlines"].shape == (e["streamlines"], 64, 3)
        assert set(np.unique(t["split"])) == {0, 1, 2}  # train, validation, test
        assert (t["split"] == 0).sum() == e["train_streamlines"]
        # a held-out group is whole: all its streamlines share the split code
        per_group = [np.unique(t["split"][t["group"] == g]) for g in np.unique(t["group"])]
        assert all(len(c) == 1 for c in per_group)
        codes = np.concatenate(per_group)
        assert (codes == 1).sum() == e["val_groups"] == 1 and (codes == 2).sum() == e["test_groups"] == 1
    assert manifest["format_version"] == 2 and manifest["split_codes"] == {"0": "train", "1": "validation", "2": "test"}
    from vqdiff.training.data import load_dataset

    _, bundles = load_dataset(dataset)
    assert [(b.bundle, len(b.train), len(b.val_groups), len(b.test_groups)) for b in bundles] == [
        ("POPT_R", 64, 1, 1), ("PYT_R", 192, 1, 1)]


def test_split_codes_rules():
    """At least one unit per split asked for, validation first, one training unit always left; with no test
    split exactly format 1's draws (its manifests' splits and hashes are reproduced)."""
    from vqdiff.training.data import TEST, TRAIN, VAL, split_codes

    def counts(n, v=0.1, t=0.1):
        c = split_codes(n, np.random.default_rng(0), v, t)
        return int((c == TRAIN).sum()), int((c == VAL).sum()), int((c == TEST).sum())

    assert [counts(n) for n in (1, 2, 3, 10, 40)] == [(1, 0, 0), (1, 1, 0), (1, 1, 1), (8, 1, 1), (32, 4, 4)]
    assert counts(10, 0.1, 0.0) == (9, 1, 0) and counts(10, 0.0, 0.2) == (8, 0, 2) and counts(5, 0.0, 0.0) == (5, 0, 0)
    for n in (2, 5, 17, 64):  # format 1's rule: max(1, round(f n)) validation units by one rng.choice
        old = np.zeros(n, bool)
        old[np.random.default_rng(4).choice(n, size=max(1, round(0.1 * n)), replace=False)] = True
        np.testing.assert_array_equal(split_codes(n, np.random.default_rng(4), 0.1, 0.0) == VAL, old)


def test_format_1_manifest_still_reads(dataset, tmp_path, subject_dir):
    """A dataset written before the test split (format 1: codes 0/1, no test keys) loads with no test groups,
    and --test-fraction 0 reproduces it: the same shards and the same manifest hash."""
    from vqdiff.training.data import load_dataset, prepare_dataset

    src = tmp_path / "src"
    src.mkdir()
    (src / "POPT_R.trk").symlink_to(subject_dir / "POPT_R.trk")
    m = prepare_dataset(src, tmp_path / "v1", val_fraction=0.1, test_fraction=0.0, seed=3)
    assert all(e["test_groups"] == 0 for e in m["shards"])
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    import hashlib

    v1_hash = hashlib.sha256(json.dumps([(e["source_sha256"], e["subject"], e["bundle"]) for e in manifest["shards"]]
                                        + [3, 0.1]).encode()).hexdigest()
    assert manifest["sha256"] == v1_hash  # format 1's formula
    for key in ("test_fraction", "test_subjects", "split_codes"):
        del manifest[key]
    for e in manifest["shards"]:
        del e["test_groups"]
    manifest["format_version"] = 1
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps(manifest))
    got, bundles = load_dataset(tmp_path / "v1")
    assert got["test_fraction"] == 0.0 and len(bundles[0].val_groups) == 1 and len(bundles[0].test_groups) == 0
    assert len(bundles[0].train) == 128


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
    m = prepare_dataset(tmp_path / "in", tmp_path / "out", val_fraction=0.34, test_fraction=0.34, seed=0)
    assert m["split_by"] == "subject" and len(m["val_subjects"]) == 1 and len(m["test_subjects"]) == 1
    assert not set(m["val_subjects"]) & set(m["test_subjects"])
    for e in m["shards"]:
        assert (e["val_groups"], e["test_groups"]) in ((0, 0), (e["groups"], 0), (0, e["groups"]))
        assert (e["test_groups"] > 0) == (e["subject"] in m["test_subjects"])


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


@pytest.mark.parametrize("aug", [(), AUG_FLAGS], ids=["plain", "augmented"])
def test_resume_is_exact(dataset, tmp_path, aug):
    _train(dataset, tmp_path / "straight", "--steps", "6", "--eval-every", "6", *aug)
    _train(dataset, tmp_path / "resumed", "--steps", "6", "--eval-every", "3", "--time-limit", "0", *aug)
    first = load_checkpoint(tmp_path / "resumed" / "last")
    assert first.info["training"]["steps_done"] == 1  # the zero time limit stops after one step
    _train(dataset, tmp_path / "resumed", "--steps", "6", "--eval-every", "3", *aug)
    tr = load_checkpoint(tmp_path / "resumed" / "last").info["training"]
    if aug:  # recorded in the config, the mirror plane too (POPT_R / PYT_R: no pair, so the midrange)
        assert tr["mirror_prob"] == 0.5 and tr["scale_range"] == [0.9, 1.1] and tr["elastic_mm"] == 3
        (plane,) = tr["mirror_planes_x"].values()  # one subject
        assert "midrange" in plane["from"]
    else:
        assert tr["mirror_prob"] == 0 and "mirror_planes_x" not in tr
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
    # the default split is test when the dataset has one, and everything says so
    assert printed["split"] == metrics["split"] == "test" and metrics["split_label"] == "within-subject test"
    assert "test split" in printed["split_note"] and metrics["data_split"]["test_fraction"] == 0.1
    assert set(metrics["per_bundle"]) == {"POPT_R", "PYT_R"} and metrics["groups"] == 2
    assert metrics["mdf_mm"] > 0 and metrics["pointwise_mm"] >= metrics["mdf_mm"] - 1e-9
    rob = metrics["robustness"]
    assert rob["buan"][0] == pytest.approx(1.0) and 0 <= rob["auc"] <= 1
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| PYT_R |" in table and "0.998822 ± 0.003826" in table  # the paper's VQ-Diff PYT_R entry
    assert table.startswith("BUAN at threshold 5.0 on the within-subject test groups")
    # the model card labels the test numbers and the (validation) learning curve
    from vqdiff.training.model_card import write_card

    card = (write_card(tmp_path / "run", tmp_path / "eval", tmp_path / "model", command="x") / "MODEL_CARD.md").read_text()
    assert "| within-subject test BUAN (T = 5) |" in card and "validation 10% (selection" in card
    assert "test 10% (never seen in training or selection)" in card and "## Learning curve (validation (selection)" in card
    for png in ("reconstructions.png", "latent_tsne.png", "perturbation.png"):
        data = (tmp_path / "eval" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    # the five-kind table picks up <kind>-eval folders
    from vqdiff.training.table1 import build_table

    (tmp_path / "runs").mkdir()
    (tmp_path / "eval").rename(tmp_path / "runs" / "vq_diff-eval")
    md = build_table(tmp_path / "runs", paper)
    assert "| PYT_R | " in md and "0.998822 ± 0.003826" in md and "| vq_diff | " in md


def test_evaluate_split_val_and_datasets_without_test(dataset, tmp_path, subject_dir):
    from vqdiff.training.data import prepare_dataset

    _train(dataset, tmp_path / "run", "--steps", "1", "--eval-every", "1")
    ck = tmp_path / "run" / "best"
    proc = _run("vqdiff.training.cli_evaluate", ck, dataset, tmp_path / "val", "--split", "val", "--no-figures",
                "--directions", "1")
    printed = json.loads(proc.stdout)
    assert printed["split"] == "val" and printed["split_label"] == "validation (selection)" and not printed["split_note"]
    assert (tmp_path / "val" / "table.md").read_text().startswith("BUAN at threshold 5.0 on the validation (selection)")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "POPT_R.trk").symlink_to(subject_dir / "POPT_R.trk")
    prepare_dataset(tmp_path / "src", tmp_path / "notest", test_fraction=0.0, seed=3)
    proc = _run("vqdiff.training.cli_evaluate", ck, tmp_path / "notest", tmp_path / "e2", "--no-figures",
                "--directions", "1")
    printed = json.loads(proc.stdout)
    assert printed["split"] == "val" and "no test split" in printed["split_note"] and "optimistic" in proc.stderr
    proc = _run("vqdiff.training.cli_evaluate", ck, tmp_path / "notest", tmp_path / "e3", "--split", "test",
                check=False)
    assert proc.returncode == 2 and "no test split" in proc.stderr


def test_training_never_reads_the_test_groups(dataset, tmp_path):
    """Test streamlines turned into NaN change nothing in training (the normalisation, the templates, the
    validation, the weights), and they are the only ones the evaluation of --split test reads."""
    import shutil

    from safetensors.numpy import save_file

    from vqdiff.training.train import TrainConfig, Trainer

    poisoned = tmp_path / "poisoned"
    shutil.copytree(dataset, poisoned)
    for shard in (poisoned / "shards").iterdir():
        t = load_file(str(shard))
        t["streamlines"][t["split"] == 2] = np.nan
        save_file(t, str(shard))
    cfg = TrainConfig(kind="ae", model=json.loads(TINY_MODEL), steps=2, batch_size=4, eval_every=2)
    runs = {}
    for name, data in (("clean", dataset), ("poisoned", poisoned)):
        tr = Trainer(cfg, data, tmp_path / name, device="cpu", progress=False)
        assert np.isfinite(tr.val_groups).all()
        runs[name] = (tr.run(), tr)
    (a, ta), (b, tb) = runs["clean"], runs["poisoned"]
    # (a NaN that reached training would make everything NaN; in one process the two runs may differ in the
    # last bits only, as oneDNN picks its kernels on first use)
    assert ta.norm == tb.norm and b["val_mdf"] == pytest.approx(a["val_mdf"], rel=1e-6)
    for k, v in ta.model.state_dict().items():
        assert torch.isfinite(tb.model.state_dict()[k].float()).all()
        torch.testing.assert_close(v, tb.model.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_fine_tune_from_a_checkpoint(dataset, tmp_path, subject_dir):
    """--init-from: the checkpoint's weights, architecture and normalisation (not refitted), its kind
    adopted (a different one refused), recorded in the config; resumes exactly; a resume that would
    mix runs is refused."""
    from vqdiff.training.data import prepare_dataset
    from vqdiff.training.train import TrainConfig, Trainer

    _train(dataset, tmp_path / "src", "--kind", "vq", "--steps", "2", "--eval-every", "2")
    init = tmp_path / "src" / "best"
    source = load_checkpoint(init)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "POPT_R.trk").symlink_to(subject_dir / "POPT_R.trk")
    other = tmp_path / "other"  # another training set: its own fitted normalisation would differ
    prepare_dataset(tmp_path / "in", other, seed=1)

    def tune(out, *extra, check=True):
        return _run("vqdiff.training.cli_train", other, out, "--init-from", init, "--batch-size", "4",
                    "--threads", "1", "--no-progress", *extra, check=check)

    tr = Trainer(TrainConfig(kind="vq", init_from=str(init), steps=1), other, tmp_path / "probe", device="cpu",
                 progress=False)
    for k, v in source.model.state_dict().items():
        torch.testing.assert_close(tr.model.state_dict()[k], v, rtol=0, atol=0)
    assert tr.norm == source.normalisation
    tune(tmp_path / "straight", "--steps", "4", "--eval-every", "4", *AUG_FLAGS)
    tuned = load_checkpoint(tmp_path / "straight" / "last")
    assert tuned.model.kind == "vq" and tuned.model.config == source.model.config
    assert tuned.normalisation == source.normalisation  # adopted, not refitted
    rec = tuned.info["training"]["init_from"]
    assert rec == {"path": str(init), "model_id": source.model_id, "sha256": source.model_hash, "kind": "vq"}
    # resume of a fine-tuning run is exact
    tune(tmp_path / "resumed", "--steps", "4", "--eval-every", "2", "--time-limit", "0", *AUG_FLAGS)
    tune(tmp_path / "resumed", "--steps", "4", "--eval-every", "2", *AUG_FLAGS)
    b = load_checkpoint(tmp_path / "resumed" / "last").model.state_dict()
    for k, v in tuned.model.state_dict().items():
        torch.testing.assert_close(v, b[k], rtol=0, atol=0, msg=f"{k} differs after resuming a fine-tuning run")
    # refusals: another kind, another architecture, a resume without (or with another) --init-from
    proc = tune(tmp_path / "k", "--kind", "vq_diff", check=False)
    assert proc.returncode == 2 and "'vq' model but --kind is 'vq_diff'" in proc.stderr
    proc = tune(tmp_path / "m", "--model", TINY_MODEL, check=False)
    assert proc.returncode == 2 and "cannot change the architecture" in proc.stderr
    proc = _run("vqdiff.training.cli_train", other, tmp_path / "resumed", "--kind", "vq", "--model", TINY_MODEL,
                "--bottleneck", TINY_CODES, "--steps", "6", "--threads", "1", "--no-progress", check=False)
    assert proc.returncode == 2 and "fine-tuned from" in proc.stderr and "--init-from" in proc.stderr


def test_patience_stops_early_and_stays_stopped(dataset, tmp_path):
    out = tmp_path / "run"
    args = ("--kind", "ae", "--lr", "0", "--schedule", "constant", "--steps", "10", "--eval-every", "1",
            "--patience", "1")
    proc = _run("vqdiff.training.cli_train", dataset, out, "--model", TINY_MODEL, "--batch-size", "2", "--threads",
                "1", "--no-progress", *args)
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["step"] == 2 and result["stop_reason"] == "patience" and result["selection_split"] == "validation"
    proc = _run("vqdiff.training.cli_train", dataset, out, "--model", TINY_MODEL, "--batch-size", "2", "--threads",
                "1", "--no-progress", *args)
    again = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert again["step"] == 2 and again["stop_reason"] == "patience"


def test_augmentation_flags_out_of_bounds_are_refused(dataset, tmp_path):
    proc = _run("vqdiff.training.cli_train", dataset, tmp_path / "x", "--rotate-deg", "45", check=False)
    assert proc.returncode == 2 and "registration's rotation bound" in proc.stderr
