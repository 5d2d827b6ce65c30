"""Fast in-process tests of the service's pieces: .npy payloads, the request guard, the pipeline."""

from __future__ import annotations

import json
import signal

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
    assert [w.name for w in (bento / "env" / "python" / "wheels").iterdir()] == ["vqdiff-0.2.0-py3-none-any.whl"]
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


# ---------------------------------------------------------------------------------------------- drain
class _FakeUvicorn:
    """Stands for uvicorn.Server: the drain hands over to its ``handle_exit`` and bounds its grace."""

    def __init__(self, grace=None):
        from types import SimpleNamespace

        self.config = SimpleNamespace(timeout_graceful_shutdown=grace)
        self.exits = []

    def handle_exit(self, sig, frame):
        import time

        self.exits.append((sig, time.monotonic()))


def _drained_app(gate):
    from starlette.responses import JSONResponse

    async def slow(request):
        await request.body()
        await gate.wait()
        return PlainTextResponse("done")

    async def ready(request):
        return PlainTextResponse("ready")

    return Starlette(routes=[Route("/encode", slow, methods=["POST"]), Route("/readyz", ready),
                             Route("/livez", ready), Route("/model", lambda r: JSONResponse({"ok": 1}))])


def test_drain_refuses_new_requests_and_hands_over_when_in_flight_requests_are_done():
    """After SIGTERM (here: `begin`): /readyz and new API posts get 503 + Retry-After at once, other routes
    and the request in flight are served, and uvicorn's handler runs only once nothing is in flight."""
    import asyncio
    import time

    import httpx

    from vqdiff.service.lifecycle import Drain

    async def main():
        gate = asyncio.Event()
        drain = Drain(_drained_app(gate), drain_s=10, refuse=frozenset({"/encode"}))
        server = _FakeUvicorn()
        drain._previous = server.handle_exit
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=drain), base_url="http://t") as c:
            files = {"file": ("a.trk", b"TRACK" + b"x" * 100)}
            held = asyncio.create_task(c.post("/encode", files=files))
            while drain.in_flight < 1:
                await asyncio.sleep(0.01)
            assert (await c.get("/readyz")).status_code == 200 and not drain.draining
            drain.begin()
            drain.begin()  # a second SIGTERM (circus and a process-group kill) changes nothing
            t0 = time.monotonic()
            ready, refused = await c.get("/readyz"), await c.post("/encode", files=files)
            refused_in = time.monotonic() - t0
            others = [(await c.get(p)).status_code for p in ("/livez", "/model")]
            await asyncio.sleep(0.3)
            assert server.exits == [] and drain.in_flight == 1  # still waiting for the request in flight
            gate.set()
            done = await held
            await asyncio.wait_for(drain.task, 5)
        return drain, server, ready, refused, refused_in, others, done

    drain, server, ready, refused, refused_in, others, done = asyncio.run(main())
    assert ready.status_code == 503 and ready.json()["error"] == "draining"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1" and refused.json()["error"] == "draining"
    assert refused_in < 1.0 and others == [200, 200]
    assert done.status_code == 200 and done.text == "done"
    assert len(server.exits) == 1 and server.exits[0][0] == signal.SIGTERM
    grace = server.config.timeout_graceful_shutdown
    assert 0.5 <= grace <= 10 and server.exits[0][1] - drain.since < 2.0


def test_drain_stops_at_its_deadline_and_bounds_uvicorns_grace():
    import asyncio

    from vqdiff.service.lifecycle import Drain

    async def main():
        gate = asyncio.Event()
        drain = Drain(_drained_app(gate), drain_s=1.5, margin_s=0.5, refuse=frozenset({"/encode"}))
        server = _FakeUvicorn(grace=300)
        drain._previous = server.handle_exit
        drain.in_flight = 1  # a request that will not finish in time
        drain.begin()
        await asyncio.wait_for(drain.task, 5)
        return drain, server

    drain, server = asyncio.run(main())
    (sig, at), = server.exits
    assert 0.9 <= at - drain.since <= 1.4  # drain_s - margin_s
    assert 0.5 <= server.config.timeout_graceful_shutdown <= 0.6  # what is left of drain_s, not uvicorn's 300


def test_drain_installs_on_lifespan_startup_and_reacts_to_the_signal():
    """The handler is installed when the lifespan start-up completes (after uvicorn's own) and a real
    signal starts the drain; the dependency side waits for its callers' processes (none here)."""
    import asyncio
    import os

    from vqdiff.service.lifecycle import Drain

    sig = signal.SIGUSR2  # not SIGTERM: this is the test runner's own process
    before = signal.getsignal(sig)

    async def main():
        drain = Drain(_drained_app(asyncio.Event()), drain_s=5, callers=frozenset({"no-such-service"}), signum=sig)
        inbox: asyncio.Queue = asyncio.Queue()
        sent = []

        async def send(message):
            sent.append(message["type"])

        await inbox.put({"type": "lifespan.startup"})
        life = asyncio.create_task(drain({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
        while "lifespan.startup.complete" not in sent:
            await asyncio.sleep(0.01)
        assert signal.getsignal(sig) == drain._on_signal
        server = _FakeUvicorn()
        drain._previous = server.handle_exit  # instead of the default action of SIGUSR2
        os.kill(os.getpid(), sig)
        while drain.task is None:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(drain.task, 5)
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(life, 5)
        return server, sent

    try:
        server, sent = asyncio.run(main())
    finally:
        signal.signal(sig, before)
    assert [s for s, _ in server.exits] == [sig] and sent[-1] == "lifespan.shutdown.complete"


def test_worker_service_names_and_sibling_count():
    from vqdiff.service.lifecycle import _service_of, live_sibling_workers

    cmd = ["python", "-m", "_bentoml_impl.worker.service", "svc:App", "--service-name", "vqdiff-model", "--fd", "5"]
    assert _service_of(cmd) == "vqdiff-model"
    assert _service_of(["python", "-m", "pytest", "--service-name", "x"]) is None
    assert live_sibling_workers(frozenset({"vqdiff"})) == 0  # pytest's siblings are no BentoML workers


def test_arbiter_removes_the_socket_folder_only_after_the_workers_stop(monkeypatch):
    import contextlib
    from unittest import mock

    from bentoml._internal.utils.circus import Arbiter
    from circus.arbiter import Arbiter as CircusArbiter

    from vqdiff.service.lifecycle import keep_sockets_until_workers_stop

    assert keep_sockets_until_workers_stop() and keep_sockets_until_workers_stop()  # idempotent
    removed = []
    fake = mock.MagicMock(spec=["exit_stack", "ctrl", "evpub_socket", "sockets", "_running"])
    fake.exit_stack = contextlib.ExitStack()
    fake.exit_stack.callback(removed.append, "uds folder")
    fake.sockets = []
    monkeypatch.setattr(CircusArbiter, "stop", lambda self: "stopping the watchers")
    assert Arbiter.stop(fake) == "stopping the watchers" and removed == []  # BentoML's own removed it here
    Arbiter.stop_controller_and_close_sockets(fake)
    assert removed == ["uds folder"] and fake.ctrl.stop.called


def test_heap_trim_runs_while_requests_come_and_stops_with_the_lifespan():
    import asyncio

    import httpx

    from vqdiff.service.lifecycle import HeapTrim, _malloc_trim

    calls = []

    async def main():
        trim = HeapTrim(_drained_app(asyncio.Event()), interval_s=0.05)
        trim._trim = calls.append  # instead of glibc's malloc_trim
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=trim), base_url="http://t") as c:
            await asyncio.sleep(0.15)
            assert calls == []  # nothing before the first request
            for _ in range(3):
                assert (await c.get("/livez")).status_code == 200
                await asyncio.sleep(0.08)
            await asyncio.sleep(0.2)
            n = len(calls)
            await asyncio.sleep(0.2)
            assert len(calls) == n  # idle: no more trims
        inbox: asyncio.Queue = asyncio.Queue()
        for m in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
            await inbox.put(m)
        sent = []

        async def send(message):
            sent.append(message["type"])

        await trim({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)
        await asyncio.sleep(0)
        return n, trim, sent

    n, trim, sent = asyncio.run(main())
    assert 1 <= n <= 4 and calls == [0] * n and trim.task.cancelled() and "lifespan.shutdown.complete" in sent
    assert HeapTrim(None, interval_s=0)._trim is None  # off
    assert _malloc_trim() is None or _malloc_trim()(0) in (0, 1)
