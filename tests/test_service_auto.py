"""What users run: the service, batch encoding and the Python API on the default ``auto`` engine selection
(the rest of the suite pins ``VQDIFF_ENGINE=torch-fp32``, tests/conftest.py). A real ``bentoml serve``
with the service's own defaults but one worker of one thread, and the same thread count on the other
paths, so that all three meet the same cached decision (`vqdiff.export.select`; the cache key holds it)."""

from __future__ import annotations

import pytest

pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")

from serving import ServeProcess, make_dev_model  # noqa: E402

from vqdiff.latents import Latents  # noqa: E402


def test_auto_engine_service_batch_and_api_write_the_same_bytes(subject_dir, tmp_path, monkeypatch):
    from vqdiff.batch.job import run_batch
    from vqdiff.export.runtime import make_codec

    monkeypatch.setenv("VQDIFF_ENGINE", "auto")
    monkeypatch.setenv("VQDIFF_ENGINE_CACHE", str(tmp_path / "engines"))  # a fresh selection, run once below
    model = make_dev_model(tmp_path / "model", subject_dir)
    src = subject_dir / "PYT_R.trk"
    codec = make_codec(model, threads=1)  # selects (gate + timing) and caches the decision
    assert codec.engine.selection["mode"] == "auto", codec.engine.selection
    api = codec.encode_file(src).to_bytes()

    (tmp_path / "in" / "sub-01").mkdir(parents=True)
    (tmp_path / "in" / "sub-01" / src.name).symlink_to(src)
    summary = run_batch("encode", tmp_path / "in", tmp_path / "out", model=model, threads=1, batch_size=5,
                        progress=False)
    assert summary["done"] == 1, summary
    batch = (tmp_path / "out" / "sub-01" / "PYT_R.vqlat").read_bytes()

    env = {"VQDIFF_MODEL": str(model), "VQDIFF_MODEL_TAG": "", "VQDIFF_API_TOKEN": "", "VQDIFF_WORKERS": "1",
           "VQDIFF_THREADS": "1", "BENTOML_HOME": str(tmp_path / "bentoml")}
    with ServeProcess(env, log_path=tmp_path / "serve.log") as server:
        with httpx.Client(base_url=server.url, timeout=120.0) as client:
            card = client.get("/model").json()
            r = client.post("/encode", files={"file": (src.name, src.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert card["selection"]["mode"] == "auto" and card["selection"]["cache"] == "hit", card["selection"]
    assert card["engine_variant"] == codec.engine.variant_name
    assert Latents.from_bytes(api).provenance == Latents.from_bytes(r.content).provenance
    assert r.content == api, "service and API latents differ"
    assert batch == api, "batch and API latents differ"
