"""A worker's graceful drain on SIGTERM (`Drain`, an ASGI middleware; its heap trimming is
`vqdiff.memory.trim_heap`). Public means only: ASGI, the standard library's `signal` and `asyncio`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

from .errors import ApiError
from .guard import OPEN_PATHS, RETRY_AFTER_S

log = logging.getLogger("bentoml.vqdiff")


class Drain:
    """Graceful stop of one worker on SIGTERM within ``drain_s`` s (uvicorn alone would stop accepting at
    once, later connections reset). From the signal on, ``/readyz`` and new POSTs to the ``refuse``
    routes get 503 + ``Retry-After`` (other routes are served); once nothing is in flight here, or at
    ``drain_s - margin_s`` (what still runs is cancelled: a 503 if its answer had not started), the
    handler installed before ours (uvicorn's) gets the signal. Ours is installed (`signal.signal`) when
    the lifespan start-up completes, after uvicorn's; SIGINT keeps uvicorn's quick stop."""

    def __init__(self, app, *, drain_s: float, refuse: frozenset[str] = frozenset(), margin_s: float = 2.0,
                 retry_after_s: int = RETRY_AFTER_S, signum: int = signal.SIGTERM):
        self.app, self.drain_s, self.refuse, self.signum = app, float(drain_s), frozenset(refuse), signum
        self.margin_s, self.retry_after_s = min(float(margin_s), self.drain_s / 2), int(retry_after_s)
        self.running: set[asyncio.Task] = set()
        self.since: float | None = None  # time.monotonic() of the signal
        self.task: asyncio.Task | None = None
        self._loop, self._previous = None, None

    @property
    def in_flight(self) -> int:
        return len(self.running)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self._watch_startup(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        if self.since is not None and (path == "/readyz" or (path in self.refuse and scope["method"] == "POST")):
            return await self._refuse(scope, receive, send, "this server is shutting down and takes no new "
                                      "requests; retry (another replica answers)")
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        started = []

        async def watched_send(message):
            started.append(True)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, watched_send))
        self.running.add(task)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():  # this request itself was cancelled (the client went away)
                task.cancel()
                raise
            if not started:
                await self._refuse(scope, receive, send, "the drain time ran out before this request finished")
        finally:
            self.running.discard(task)

    async def _refuse(self, scope, receive, send, message: str) -> None:
        left = max(0.0, self.since + self.drain_s - time.monotonic())
        err = ApiError(503, "draining", f"{message}; retry after {self.retry_after_s} s", retry_after_s=self.retry_after_s,
                       headers={"Retry-After": str(self.retry_after_s)}, drain_left_s=round(left, 1))
        await err.to_response()(scope, receive, send)

    def _watch_startup(self, send):
        async def watched(message):
            if message.get("type") == "lifespan.startup.complete":
                self.install()
            await send(message)

        return watched

    def install(self) -> bool:
        """Take over ``signum`` in this process (main thread only; the running loop runs the drain)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("graceful drain not installed: the server does not run in the main thread")
            return False
        self._loop = asyncio.get_running_loop()
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)
        return True

    def _on_signal(self, signum, frame) -> None:
        self._loop.call_soon_threadsafe(self.begin, signum)  # the drain runs on the server's loop

    def begin(self, signum: int | None = None) -> None:
        """Start draining (idempotent: the arbiter and a group kill may both send the signal)."""
        if self.since is not None:
            return
        self.since = time.monotonic()
        log.warning("SIGTERM: draining (%d request(s) in flight, at most %.0f s)", self.in_flight, self.drain_s)
        self.task = asyncio.get_running_loop().create_task(self._drain(self.signum if signum is None else signum))

    async def _drain(self, signum: int) -> None:
        deadline = self.since + self.drain_s - self.margin_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        waited = time.monotonic() - self.since
        if self.running:
            log.warning("drain time is up after %.1f s: cancelling %d request(s)", waited, self.in_flight)
            for task in list(self.running):
                task.cancel()
            await asyncio.sleep(0.1)  # their 503s go out
        else:
            log.info("drained in %.1f s: stopping", waited)
        previous = self._previous
        if callable(previous):
            previous(signum, None)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
