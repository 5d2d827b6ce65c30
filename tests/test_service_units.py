"""Fast in-process tests of the service's pieces: .npy payloads, the request guard, the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("bentoml")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from vqdiff.service import npy  # noqa: E402
from vqdiff.service.errors import ApiError  # noqa: E402
from vqdiff.service.guard import RefusePickle, RequestGuard  # noqa: E402


def test_npy_round_trip_plain_and_structured():
    a = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    assert np.array_equal(npy.loads(npy.dumps(a)), a)
    s = np.zeros(2, dtype=[("latents", "<f4", (64, 16, 16)), ("indices", "<i8", (16, 16))])
    s["indices"] = 7
    back = npy.loads(npy.dumps(s))
    assert back.dtype == s.dtype and (back["indices"] == 7).all()


def test_npy_refuses_pickle():
    with pytest.raises(TypeError):
        npy.dumps(np.array([{"a": 1}], dtype=object))
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        npy.loads(buf.getvalue())


def test_npy_group_validator():
    ok = np.zeros((2, 3, 64, 64), np.float32)
    assert npy._float_groups(npy.dumps(ok)).shape == (2, 3, 64, 64)
    for bad in (np.zeros((2, 3, 64), np.float32), np.zeros((0, 3, 64, 64), np.float32),
                np.zeros((1, 3, 64, 64), np.float64), np.full((1, 3, 64, 64), np.nan, np.float32)):
        with pytest.raises(ValueError):
            npy._float_groups(npy.dumps(bad))


def _echo_app():
    async def echo(request):
        form = await request.form()
        data = await form["file"].read()
        return PlainTextResponse(f"ok {len(data)}")

    return Starlette(routes=[Route("/encode", echo, methods=["POST"]), Route("/livez", lambda r: PlainTextResponse("ok"))])


@pytest.fixture
def guarded():
    def make(**kw):
        return TestClient(RequestGuard(_echo_app(), max_upload_bytes=kw.pop("limit", 1000), **kw))

    return make


def test_guard_passes_a_good_upload(guarded):
    r = guarded().post("/encode", files={"file": ("a.trk", b"TRACK" + b"x" * 100)})
    assert r.status_code == 200 and r.text == "ok 105"


@pytest.mark.parametrize("kwargs, status, reason", [
    ({"data": {"file": "http://169.254.169.254/latest/meta-data"}}, 415, "unsupported_media_type"),
    ({"json": {"file": "https://example.com/a.trk"}}, 415, "unsupported_media_type"),
    ({"content": b"\x80\x04K\x01.", "headers": {"content-type": "application/vnd.bentoml+pickle"}}, 415,
     "unsupported_media_type"),
    ({"files": {"file": (None, "https://example.com/a.trk")}}, 400, "url_not_allowed"),
    ({"files": {"file": (None, "just text")}}, 400, "not_a_file"),
    ({"files": {"file": ("a.trk", b"TRACK", "text/html")}}, 415, "unsupported_part_type"),
    ({"files": {"file": ("a.trk", b"TRACK"), "evil": (None, "1")}}, 400, "unknown_field"),
    ({"files": {"summary": (None, "true")}}, 400, "missing_file"),
    ({"files": {"file": ("a.trk", b"x" * 5000)}}, 413, "upload_too_large"),
    ({"content": b"--zz\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400, "bad_multipart"),
    ({"content": b"--zz\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--zz--\r\n",
      "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400, "bad_multipart"),
])
def test_guard_refusals(guarded, kwargs, status, reason):
    r = guarded().post("/encode", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == reason and body["message"] and body["status"] == status


def test_guard_streamed_body_over_limit(guarded):
    def chunks():
        for _ in range(10):
            yield b"y" * 400

    r = guarded().post("/encode", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


def test_guard_auth(guarded):
    client = guarded(api_token="s3cret")
    files = {"file": ("a.trk", b"TRACK")}
    assert client.post("/encode", files=files).status_code == 401
    assert client.post("/encode", files=files, headers={"Authorization": "Bearer nope"}).json()["error"] == \
        "invalid_token"
    assert client.post("/encode", files=files, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/livez").status_code == 200  # probes stay open


def test_refuse_pickle():
    client = TestClient(RefusePickle(_echo_app()))
    r = client.post("/encode", content=b"x", headers={"content-type": "application/vnd.bentoml+pickle"})
    assert r.status_code == 415 and r.json()["error"] == "pickle_refused"


def test_api_error_body():
    err = ApiError(413, "too_many_streamlines", "too many", "fewer", limit_streamlines=5)
    assert json.loads(err.to_bytes()) == {"error": "too_many_streamlines", "message": "too many", "status": 413,
                                          "accepted": "fewer", "limit_streamlines": 5}


def test_original_name():
    from pathlib import Path

    from vqdiff.service.pipeline import original_name

    assert original_name(Path("/tmp/x/tmpab_cd123IFOF_R.trk")) == "IFOF_R"
    assert original_name(Path("/tmp/x/tmpab_cd123")) == "bundle"


@pytest.mark.parametrize("bentofile, name", [(None, "vqdiff"), ("service/bentofile-gpu.yaml", "vqdiff-gpu")])
def test_bentoml_build(tmp_path, bentofile, name):
    """Both bentos build here (CPU: bentofile.yaml; GPU: service/bentofile-gpu.yaml): the vqdiff wheel
    installed (one name per module), the bundled model, no sources, runs/, .venv or tests."""
    import os
    import subprocess
    import sys

    import yaml
    from serving import REPO

    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "True"}
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist",
                            "."], cwd=REPO, capture_output=True, text=True, timeout=300)  # as `make wheel`
    assert wheel.returncode == 0, wheel.stdout[-2000:] + wheel.stderr[-2000:]
    cmd = [sys.executable, "-m", "bentoml", "build", "-o", "tag", *(["-f", bentofile] if bentofile else []), "."]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].split("__tag__:")[-1].strip()
    bento = tmp_path / "bentos" / name / tag.split(":")[1]
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "vqdiff.service.app:Gateway"
    assert {s["name"] for s in info["services"]} == {"vqdiff", "vqdiff-model"}
    model_cfg = next(s for s in info["services"] if s["name"] == "vqdiff-model")["config"]
    assert model_cfg["resources"]["gpu"] == 1 and model_cfg["workers"] == 1
    src = bento / "src"
    assert (src / "models" / "default" / "model.safetensors").is_file()
    assert not any((src / d).exists() for d in ("vqdiff", "service", "export", "runs", ".venv", "tests", "training"))
    assert [w.name for w in (bento / "env" / "python" / "wheels").iterdir()] == ["vqdiff-0.1.0-py3-none-any.whl"]
    reqs = (bento / "env" / "python" / "requirements.txt").read_text()
    assert ("onnxruntime-gpu" in reqs) == (name == "vqdiff-gpu")


def test_batch_wait_is_capped():
    from bentoml._internal.marshal.dispatcher import Optimizer

    from vqdiff.service.model_service import cap_batch_wait

    original = Optimizer.trigger_refresh
    try:
        assert cap_batch_wait(0.05)
        opt = Optimizer(30.0)
        for _ in range(10):
            opt.o_stat.append((4, 0.2, 3.0))  # (requests, duration, wait): a burst queued for seconds
        opt.trigger_refresh()
        assert opt.wait == 0.05 and opt.o_a > 0
        assert cap_batch_wait(0.01)  # re-capping replaces the cap instead of stacking wrappers
        opt.trigger_refresh()
        assert opt.wait == 0.01 and Optimizer.trigger_refresh.__wrapped__ is original
    finally:
        Optimizer.trigger_refresh = original


def test_guard_refuses_past_the_concurrency_limit_at_once():
    """Past max_in_flight requests in flight, a new one gets a 503 with Retry-After immediately; the
    counter comes back down when requests finish (and after refusals)."""
    import asyncio
    import time

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    gate = asyncio.Event()

    async def slow(request):
        await request.body()
        await gate.wait()
        return PlainTextResponse("ok")

    guard = RequestGuard(Starlette(routes=[Route("/encode", slow, methods=["POST"])]), max_upload_bytes=10_000,
                         max_in_flight=2)
    import httpx

    async def main():
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            files = {"file": ("a.trk", b"TRACK" + b"x" * 100)}
            held = [asyncio.create_task(c.post("/encode", files=files)) for _ in range(2)]
            while guard.in_flight < 2:
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            r = await c.post("/encode", files=files)
            refused_in = time.perf_counter() - t0
            gate.set()
            done = await asyncio.gather(*held)
            return r, refused_in, done

    r, refused_in, done = asyncio.run(main())
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"] == "overloaded"
    assert refused_in < 1.0 and [d.status_code for d in done] == [200, 200] and guard.in_flight == 0
