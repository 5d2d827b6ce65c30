"""The bundled default model: loads, and `evaluate` reproduces its model card's numbers."""

import json
from pathlib import Path

import pytest

from vqdiff.checkpoint import load_checkpoint

MODEL = Path(__file__).resolve().parents[1] / "models" / "default"
needs_model = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason=f"no bundled model at {MODEL}")


@needs_model
def test_default_model_loads_and_describes_itself():
    ck = load_checkpoint(MODEL)
    assert ck.model.kind == "vq_diff"
    assert ck.info["data_manifest_sha256"] and ck.info["training"]["steps_done"] > 0
    card = (MODEL / "MODEL_CARD.md").read_text()
    assert ck.model_hash in card


@needs_model
def test_evaluate_reproduces_model_card(subject_dir, tmp_path):
    from vqdiff.training.data import prepare_dataset
    from vqdiff.training.evaluate import evaluate

    card = json.loads((MODEL / "metrics.json").read_text())
    manifest = prepare_dataset(subject_dir, tmp_path / "data", val_fraction=0.1, seed=0)
    assert manifest["sha256"] == card["data_manifest_sha256"], "the split differs from the one the card used"
    got = evaluate(MODEL, tmp_path / "data", tmp_path / "eval", figures=False)
    assert got["groups"] == card["groups"]
    # other CPUs may round convolutions differently: distances to 0.1 %, BUAN to a few streamlines
    assert got["mdf_mm"] == pytest.approx(card["mdf_mm"], rel=1e-3)
    assert got["mse"] == pytest.approx(card["mse"], rel=1e-3)
    assert got["buan_mean"] == pytest.approx(card["buan_mean"], abs=2e-3)
    for name, m in card["per_bundle"].items():
        assert got["per_bundle"][name]["mdf_mm"] == pytest.approx(m["mdf_mm"], rel=1e-3)
