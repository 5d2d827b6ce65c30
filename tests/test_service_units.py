"""Fast in-process tests of the service's pieces: settings, the micro-batcher, the request guard, the drain."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

pytest.importorskip("bentoml")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from vqdiff.service.errors import ApiError  # noqa: E402
from vqdiff.service.guard import RequestGuard  # noqa: E402


def _echo_app():
    async def echo(request):
        form = await request.form()
        data = await form["file"].read()
        return PlainTextResponse(f"ok {len(data)} {' '.join(request.state.upload_names['file'])}")

    return Starlette(routes=[Route("/encode", echo, methods=["POST"]), Route("/livez", lambda r: PlainTextResponse("ok"))])


@pytest.fixture
def guarded():
    def make(**kw):
        return TestClient(RequestGuard(_echo_app(), max_upload_bytes=kw.pop("limit", 1000), **kw))

    return make


def test_guard_passes_a_good_upload(guarded):
    r = guarded().post("/encode", files={"file": ("a.trk", b"TRACK" + b"x" * 100)})
    assert r.status_code == 200 and r.text == "ok 105 a.trk"  # the client's file name, for the bundle's name


def test_guard_passes_several_files_up_to_the_bundle_limit(guarded):
    files = [("file", (f"{n}.trk", b"TRACK")) for n in ("a", "b", "c")]
    r = guarded(max_bundles=3).post("/encode", files=files)
    assert r.status_code == 200 and r.text.endswith(" a.trk b.trk c.trk")  # in the client's order
    r = guarded(max_bundles=2).post("/encode", files=files)
    assert r.status_code == 413 and r.json()["error"] == "too_many_bundles" and "at most 2" in r.json()["accepted"]
    r = guarded(max_bundles=3).post("/decode", files=files[:2])  # /decode takes one file
    assert r.status_code == 400 and r.json()["error"] == "duplicate_field"


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


def test_api_error_body():
    err = ApiError(413, "too_many_streamlines", "too many", "fewer", limit_streamlines=5)
    assert err.body() == {"error": "too_many_streamlines", "message": "too many", "status": 413,
                                          "accepted": "fewer", "limit_streamlines": 5}


def test_bundle_name_is_the_clients_file_name():
    from vqdiff.service.uploads import bundle_name

    assert bundle_name("IFOF_R.trk") == "IFOF_R" and bundle_name("../x/CC.TCK") == "CC"
    assert bundle_name("") == "bundle" and bundle_name(None) == "bundle" and bundle_name(".trk") == "bundle"


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
    """Stands for uvicorn.Server: the drain hands over to its ``handle_exit``."""

    def __init__(self):
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
            assert (await c.get("/readyz")).status_code == 200 and drain.since is None
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
    assert server.exits[0][1] - drain.since < 2.0


def test_drain_stops_at_its_deadline_and_cancels_what_is_still_running():
    """A request that does not finish within drain_s - margin_s is cancelled (its client gets a 503 with
    Retry-After, not a reset) and uvicorn's handler runs then, with nothing left in flight."""
    import asyncio

    import httpx

    from vqdiff.service.lifecycle import Drain

    async def main():
        gate = asyncio.Event()  # never set: the request would run for ever
        drain = Drain(_drained_app(gate), drain_s=1.5, margin_s=0.5, refuse=frozenset({"/encode"}))
        server = _FakeUvicorn()
        drain._previous = server.handle_exit
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=drain), base_url="http://t") as c:
            held = asyncio.create_task(c.post("/encode", files={"file": ("a.trk", b"TRACK")}))
            while drain.in_flight < 1:
                await asyncio.sleep(0.01)
            drain.begin()
            await asyncio.wait_for(drain.task, 5)
            return drain, server, await held

    drain, server, answer = asyncio.run(main())
    (sig, at), = server.exits
    assert 0.9 <= at - drain.since <= 1.4 and drain.in_flight == 0  # drain_s - margin_s
    assert answer.status_code == 503 and answer.json()["error"] == "draining" and answer.headers["retry-after"] == "1"


def test_drain_installs_on_lifespan_startup_and_reacts_to_the_signal():
    """The handler is installed when the lifespan start-up completes (after uvicorn's own) and a real
    signal starts the drain."""
    import asyncio
    import os

    from vqdiff.service.lifecycle import Drain

    sig = signal.SIGUSR2  # not SIGTERM: this is the test runner's own process
    before = signal.getsignal(sig)

    async def main():
        drain = Drain(_drained_app(asyncio.Event()), drain_s=5, signum=sig)
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


def test_heap_trim_runs_while_there_is_activity_only(monkeypatch):
    import asyncio

    from vqdiff import memory

    real = memory._malloc_trim()
    assert real is None or real(0) in (0, 1)  # glibc's, where there is glibc
    calls, activity = [], [0]
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)  # instead of glibc's malloc_trim

    async def main():
        task = asyncio.get_running_loop().create_task(memory.trim_heap(0.05, lambda: activity[0]))
        await asyncio.sleep(0.15)
        assert calls == []  # nothing before the first engine call
        for _ in range(3):
            activity[0] += 1
            await asyncio.sleep(0.08)
        n = len(calls)
        await asyncio.sleep(0.2)
        assert len(calls) == n  # idle: no more trims
        task.cancel()
        return n

    n = asyncio.run(main())
    assert 1 <= n <= 4 and calls == [0] * n
    assert asyncio.run(memory.trim_heap(0, lambda: 0)) is None  # off: returns at once


# ---------------------------------------------------------------------------------------------- batching
def _batcher(calls, **kw):
    from vqdiff.service.batcher import MicroBatcher

    def encode(x):
        calls.append(len(x))
        return x[:, 0, 0, 0] * 2, None

    return MicroBatcher({"encode": encode, "decode": lambda x: x + 1}, metrics=False, **kw)


def test_micro_batcher_joins_concurrent_requests_and_splits_the_answers():
    import asyncio

    calls = []

    async def main():
        b = _batcher(calls, max_groups=8, max_wait_ms=50)
        reqs = [np.full((n, 1, 1, 1), i, np.float32) for i, n in enumerate((3, 2, 3, 20, 1))]
        outs = await asyncio.gather(*(b.run("encode", x) for x in reqs))
        dec = await b.run("decode", np.zeros((2, 1), np.float32))
        b.close()
        return reqs, outs, dec, b.calls

    reqs, outs, dec, n_calls = asyncio.run(main())
    for x, (lat, idx) in zip(reqs, outs, strict=True):
        assert idx is None and np.array_equal(lat, x[:, 0, 0, 0] * 2)  # each request gets its own rows back
    assert (dec == 1).all() and dec.shape == (2, 1)
    assert max(calls) <= 8 and sum(calls) == 29  # never more than max_groups in one engine call
    assert calls[0] == 8 and len(calls) < 5 + 2  # the three small requests met in one call


def test_micro_batcher_waits_only_up_to_max_wait_and_passes_engine_errors():
    import asyncio
    import time

    calls = []

    async def main():
        b = _batcher(calls, max_groups=64, max_wait_ms=0)
        t0 = time.perf_counter()
        await b.run("encode", np.ones((2, 1, 1, 1), np.float32))
        alone = time.perf_counter() - t0
        b.fns["encode"] = lambda x: 1 / 0
        with pytest.raises(ZeroDivisionError):
            await b.run("encode", np.ones((2, 1, 1, 1), np.float32))
        b.fns["encode"] = lambda x: (x, None)
        ok = await b.run("encode", np.ones((2, 1, 1, 1), np.float32))  # the loop survives an engine error
        b.close()
        return alone, ok

    alone, ok = asyncio.run(main())
    assert alone < 0.5 and calls == [2] and ok[0].shape == (2, 1, 1, 1)


# ---------------------------------------------------------------------------------------------- settings
def test_settings_defaults_renames_and_refusals(caplog):
    from vqdiff.service.settings import Settings

    s = Settings.from_env({"VQDIFF_DEVICE": "cpu"})
    cores = os.cpu_count() or 1
    assert s.workers == max(1, cores // 4) and s.threads == max(1, cores // s.workers) and s.max_batch_groups == 64
    assert Settings.from_env({"VQDIFF_DEVICE": "cuda:0"}).workers == 1  # a GPU host: one worker, one engine
    s = Settings.from_env({"VQDIFF_DEVICE": "cpu", "VQDIFF_GATEWAY_WORKERS": "3", "VQDIFF_MAX_CONCURRENCY": "10"})
    assert s.workers == 3 and s.max_in_flight == 4 and s.engine == "auto"
    assert "VQDIFF_WORKERS" in caplog.text  # the old names are not dropped silently
    with pytest.raises(ValueError, match="VQDIFF_BACKEND.*VQDIFF_ENGINE"):  # a concept renamed: refused, naming it
        Settings.from_env({"VQDIFF_BACKEND": "torch"})
    with pytest.raises(ValueError, match="VQDIFF_ENGINE.*accepted: auto, .*ort-fp32"):  # the valid names, at start
        Settings.from_env({"VQDIFF_ENGINE": "bogus"})
    assert Settings.from_env({"VQDIFF_ENGINE": "ORT-FP32 "}).engine == "ort-fp32"
    for bad in ({"VQDIFF_WORKERS": "0"}, {"VQDIFF_MAX_UPLOAD_MB": "lots"}, {"VQDIFF_MAX_BATCH_WAIT_MS": "-1"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings.from_env(bad)


def test_batch_wait_defaults_to_0_ms_on_a_cpu_host_and_2_ms_on_a_gpu_host():
    """On the CPU an engine call costs the same per group whatever its size (a wait only delays a request);
    on a GPU concurrent requests are worth joining. An explicit value, 0 included, wins."""
    from vqdiff.service.settings import Settings

    assert Settings.from_env({"VQDIFF_DEVICE": "cpu"}).max_batch_wait_ms == 0.0
    assert Settings.from_env({"VQDIFF_DEVICE": "cuda:0"}).max_batch_wait_ms == 2.0
    assert Settings.from_env({"VQDIFF_DEVICE": "cpu", "VQDIFF_MAX_BATCH_WAIT_MS": "5"}).max_batch_wait_ms == 5.0
    assert Settings.from_env({"VQDIFF_DEVICE": "cuda", "VQDIFF_MAX_BATCH_WAIT_MS": "0"}).max_batch_wait_ms == 0.0


def test_every_setting_is_documented_once_and_the_readme_table_is_current():
    """The README's table is `markdown_table()`; every ``VQDIFF_`` name that service/ mentions is a row of
    `TABLE` (or an old name that gets a warning), once; every row but VQDIFF_ENGINE is read by `Settings`."""
    import re
    from pathlib import Path

    from vqdiff.service.settings import GONE, RENAMED, TABLE, Settings, markdown_table

    repo = Path(__file__).resolve().parents[1]
    assert markdown_table() in (repo / "README.md").read_text(), \
        "README's settings table is stale: python -m vqdiff.service.settings"
    names = [row[0] for row in TABLE]
    assert len(names) == len(set(names))
    mentioned = set(re.findall(r"VQDIFF_[A-Z_]+[A-Z]", "".join(p.read_text() for p in (repo / "service").glob("*.py"))))
    assert mentioned - set(names) - set(RENAMED) - set(GONE) == set()
    s = Settings.from_env({})
    assert {row[1] for row in TABLE if row[1]} <= set(vars(s)) and [r[0] for r in TABLE if not r[1]] == ["VQDIFF_ENGINE"]
