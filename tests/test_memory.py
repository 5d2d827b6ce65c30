"""What keeps the service's RSS bounded: `ReleaseBody` and the soak benchmark's RSS verdict."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import weakref
from pathlib import Path

import pytest

pytest.importorskip("bentoml")

from starlette.requests import Request  # noqa: E402

from vqdiff.service.lifecycle import ReleaseBody  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_request_var: contextvars.ContextVar = contextvars.ContextVar("request")  # as BentoML's ContextMiddleware


class _Payload:  # stands for a request body (bytes cannot be weakly referenced)
    def __init__(self, size: int):
        self.data = b"x" * size


def _bentoml_like_app():
    """Keeps the request in a context variable and, as the aiohttp client of the model service does,
    schedules a timer (due in 90 s) and cancels it once the answer has come."""

    async def app(scope, receive, send):
        request = Request(scope, receive)  # BentoML's context keeps this one (it never reads the body) ...
        token = _request_var.set(request)
        try:
            await Request(scope, receive).body()  # ... the route reads the body through its own Request
            timer = asyncio.get_running_loop().call_later(90, lambda: None)  # holds a copy of the context
            timer.cancel()  # asyncio keeps cancelled timers in its heap, context and all, until they are due
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        finally:
            _request_var.reset(token)

    return app


async def _serve_one(app, payload: _Payload) -> None:
    sent = False

    async def receive():  # what RequestGuard's replay of the body is: a closure holding the body
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload.data, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    scope = {"type": "http", "method": "POST", "path": "/encode", "headers": [], "query_string": b""}
    await app(scope, receive, send)


@pytest.mark.parametrize("release", [False, True])
def test_a_finished_request_keeps_no_body_alive_through_cancelled_timers(release):
    async def main():
        app = _bentoml_like_app()
        app = ReleaseBody(app) if release else app
        payload = _Payload(1 << 20)
        alive = weakref.ref(payload)
        await _serve_one(app, payload)
        del payload
        gc.collect()
        return alive() is not None  # checked while the loop (and its timer heap) still runs

    retained = asyncio.run(main())
    # without it, the cancelled timer's context -> Request -> receive -> body lives for 90 s (the bug);
    # with it, the finished request's receive no longer leads to the body
    assert retained is not release


def test_release_body_forwards_while_the_request_runs_and_answers_disconnect_after():
    kept = []

    async def app(scope, receive, send):
        kept.append(receive)
        message = await receive()
        assert message == {"type": "http.request", "body": b"abc", "more_body": False}
        await send({"type": "http.response.start", "status": 204, "headers": []})

    async def receive():
        return {"type": "http.request", "body": b"abc", "more_body": False}

    sent = []

    async def send(message):
        sent.append(message["type"])

    async def main():
        await ReleaseBody(app)({"type": "http", "path": "/encode"}, receive, send)
        return await kept[0]()

    assert asyncio.run(main()) == {"type": "http.disconnect"} and sent == ["http.response.start"]

    async def lifespan():  # other scopes pass through untouched
        seen = []

        async def inner(scope, rcv, snd):
            seen.append(rcv is receive)

        await ReleaseBody(inner)({"type": "lifespan"}, receive, send)
        return seen

    assert asyncio.run(lifespan()) == [True]


# ---------------------------------------------------------------------------------------------- bench
@pytest.fixture(scope="module")
def bench_soak():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_soak
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return bench_soak


def _series(rss_of_t, duration=300, every=5):
    """Samples as RssSampler takes them: one before the load (t=0), then every ``every`` s of load."""
    out = [{"t": 0.0, "procs": {"model:1": {"pid": 1, "VmRSS": 200.0, "cpu_s": 0.0}}}]
    for k in range(1, duration // every + 2):
        t = min(k * every, duration + 0.5)
        out.append({"t": t, "procs": {"model:1": {"pid": 1, "VmRSS": float(rss_of_t(t)), "cpu_s": t / 2}}})
    return out


def test_soak_verdict_passes_a_swinging_worker_and_fails_a_climbing_one(bench_soak):
    swing = _series(lambda t: 400 if int(t) % 10 else 900)  # trims: 400 <-> 900 MB, no trend
    rss = bench_soak.rss_summary(swing, 0.0, 300.0, 60.0, 30.0, 1.25)["model:1"]
    assert rss["level_warmup_mb"] == 900 and rss["level_end_mb"] == 900 and rss["within_bound"]
    assert rss["cpu_s"] == pytest.approx(150.25, abs=0.1)  # CPU seconds during the load
    assert bench_soak.rss_verdict({"model:1": rss}, 1.25)["ok"]

    climb = _series(lambda t: 300 + 2 * t)  # +2 MB/s: 420 MB at the end of the warm-up, 900 at the end
    rss = bench_soak.rss_summary(climb, 0.0, 300.0, 60.0, 30.0, 1.25)["model:1"]
    assert rss["level_warmup_mb"] == 420 and rss["max_growth"] > 2 and not rss["within_bound"]

    plateau = _series(lambda t: 240 + 8 * min(t, 130))  # retention that plateaus after the warm-up: caught
    rss = bench_soak.rss_summary(plateau, 0.0, 300.0, 60.0, 30.0, 1.25)["model:1"]
    assert rss["level_warmup_mb"] == 720 and rss["end_growth"] == pytest.approx(1280 / 720, abs=1e-3)
    assert not rss["within_bound"]
    verdict = bench_soak.rss_verdict({"model:1": rss, "arbiter": {**rss, "within_bound": False}}, 1.25)
    assert not verdict["ok"] and verdict["over"] == ["model:1"]  # the arbiter is not a worker


def test_release_body_sits_inside_the_body_replay_on_both_services():
    """Its place matters: after RequestGuard (whose replay closure holds the body) and as the last of
    our middlewares (BentoML adds its ContextMiddleware, which keeps the request, after them)."""
    from vqdiff.service.app import Gateway, VQDiffModel

    for service in (Gateway, VQDiffModel):
        names = [m[0].__name__ for m in service.middlewares]
        assert names[-1] == "ReleaseBody", names
    gateway = [m[0].__name__ for m in Gateway.middlewares]
    assert gateway.index("RequestGuard") < gateway.index("ReleaseBody")
