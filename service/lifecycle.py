"""Process lifecycle of the services: graceful drain on SIGTERM and heap trimming.

`Drain` (both services) is the graceful stop on SIGTERM: in-flight requests finish, new API requests
get 503 + ``Retry-After`` and ``/readyz`` 503 meanwhile, all within ``VQDIFF_DRAIN_S``;
`keep_sockets_until_workers_stop` makes BentoML's arbiter keep the model service's socket until then.
`ReleaseBody` (both services) lets a request's body go when the request is done, even where BentoML's request
object outlives it (cancelled timers keep it for the client timeout). `HeapTrim` (both services) returns free
heap pages to the OS while requests come (``VQDIFF_HEAP_TRIM_S``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

from .errors import ApiError
from .guard import OPEN_PATHS, RETRY_AFTER_S, send_error

log = logging.getLogger("bentoml.vqdiff")


# ---------------------------------------------------------------------------------------------- drain
_WORKER_MODULE = "_bentoml_impl.worker.service"


def _service_of(cmdline: list[str]) -> str | None:
    """The ``--service-name`` of a BentoML service worker's command line (None: not a worker)."""
    if _WORKER_MODULE not in cmdline:
        return None
    try:
        return cmdline[cmdline.index("--service-name") + 1]
    except (ValueError, IndexError):
        return None


def live_sibling_workers(services: frozenset[str]) -> int:
    """How many worker processes of ``services`` run beside this one (same parent: BentoML's arbiter)."""
    import psutil

    me = psutil.Process()
    parent = me.parent()
    if parent is None:
        return 0
    n = 0
    for p in parent.children():
        try:
            if p.pid == me.pid or p.status() == psutil.STATUS_ZOMBIE:
                continue
            n += _service_of(p.cmdline()) in services
        except psutil.Error:  # gone (or going) meanwhile
            continue
    return n


class Drain:
    """Graceful stop of one worker process on SIGTERM, within ``drain_s`` seconds.

    ``bentoml serve`` (its circus arbiter) relays SIGTERM to every worker of every service at the same
    moment and waits for them (BentoML sets no grace limit). Left alone, uvicorn would stop accepting at
    once (later connections wait in the listen backlog, then are reset) and the model service would close
    its connections while gateway requests still need it. Instead, on SIGTERM:

    * ``/readyz`` answers 503 at once (the load balancer stops sending) and, when ``refuse`` names
      routes, new POSTs to them get 503 + ``Retry-After`` without their body being read; ``/livez``,
      ``/metrics`` and everything else are still served;
    * the worker waits until no request is in flight here and no worker of the ``callers`` services
      (the gateway, for the model service) is alive any more, or until ``drain_s - margin_s``;
    * then uvicorn's own stop runs (the handler it installed), its grace bounded to what is left of
      ``drain_s``: requests still running after that are cancelled.

    The signal handler is installed when the ASGI lifespan start-up completes (uvicorn has installed
    its own by then); SIGINT (Ctrl+C) keeps uvicorn's quick stop.
    """

    def __init__(self, app, *, drain_s: float, refuse: frozenset[str] = frozenset(),
                 callers: frozenset[str] = frozenset(), margin_s: float = 2.0, retry_after_s: int = RETRY_AFTER_S,
                 signum: int = signal.SIGTERM):
        self.app = app
        self.drain_s = float(drain_s)
        self.refuse = frozenset(refuse)
        self.callers = frozenset(callers)
        self.margin_s = min(float(margin_s), self.drain_s / 2)
        self.retry_after_s = int(retry_after_s)
        self.signum = signum
        self.in_flight = 0
        self.since: float | None = None  # time.monotonic() of the signal
        self.task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous = None

    @property
    def draining(self) -> bool:
        return self.since is not None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self._watch_startup(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        if self.since is not None:
            if path == "/readyz":
                return await self._refuse(scope, receive, send, "this server is shutting down")
            if path in self.refuse and scope["method"] == "POST":
                return await self._refuse(scope, receive, send, "this server is shutting down and takes no new "
                                          "requests; retry (another replica answers)")
        counted = path not in OPEN_PATHS
        self.in_flight += counted
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= counted

    async def _refuse(self, scope, receive, send, message: str) -> None:
        left = max(0.0, self.since + self.drain_s - time.monotonic())
        err = ApiError(503, "draining", f"{message}; retry after {self.retry_after_s} s",
                       headers={"Retry-After": str(self.retry_after_s)}, drain_left_s=round(left, 1))
        await send_error(err, scope, receive, send)

    def _watch_startup(self, send):
        async def watched(message):
            if message.get("type") == "lifespan.startup.complete":
                self.install()
            await send(message)

        return watched

    # ------------------------------------------------------------------ signal
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
        self._loop.call_soon_threadsafe(self.begin, signum)

    def begin(self, signum: int | None = None) -> None:
        """Start draining (idempotent: circus and a group kill may both send the signal)."""
        if self.since is not None:
            return
        self.since = time.monotonic()
        log.warning("SIGTERM: draining (%d request(s) in flight, at most %.0f s)%s", self.in_flight, self.drain_s,
                    f"; waiting for the {sorted(self.callers)} workers to stop" if self.callers else "")
        self.task = asyncio.get_running_loop().create_task(self._drain(self.signum if signum is None else signum))

    def idle(self) -> bool:
        return self.in_flight == 0 and not (self.callers and live_sibling_workers(self.callers))

    async def _drain(self, signum: int) -> None:
        deadline = self.since + self.drain_s
        while time.monotonic() < deadline - self.margin_s and not self.idle():
            await asyncio.sleep(0.05)
        waited = time.monotonic() - self.since
        if self.in_flight:
            log.warning("drain time is up after %.1f s with %d request(s) in flight: stopping anyway", waited,
                        self.in_flight)
        else:
            log.info("drained in %.1f s: stopping", waited)
        self._hand_over(signum, max(0.5, deadline - time.monotonic() - 0.5))

    def _hand_over(self, signum: int, grace_s: float) -> None:
        previous = self._previous
        config = getattr(getattr(previous, "__self__", None), "config", None)  # uvicorn.Server.handle_exit
        if config is not None and hasattr(config, "timeout_graceful_shutdown"):
            current = config.timeout_graceful_shutdown
            config.timeout_graceful_shutdown = grace_s if current is None else min(current, grace_s)
        if callable(previous):
            previous(signum, None)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def keep_sockets_until_workers_stop() -> bool:
    """Make BentoML's arbiter remove the dependency services' unix sockets only after their workers stop.

    BentoML 1.4's ``Arbiter.stop`` first closes its exit stack, which deletes the folder holding the
    model service's unix socket, and only then stops the workers: during a drain, a gateway request
    that needs a new connection to the model service fails ("Cannot connect to unix socket ... No such
    file or directory"). Patched here (in the ``bentoml serve`` process, which imports the service):
    circus stops the workers first, and the exit stack is closed with the sockets at the very end.
    Checked: skipped with a warning when BentoML's arbiter has moved."""
    try:
        from bentoml._internal.utils.circus import Arbiter
        from circus.arbiter import Arbiter as CircusArbiter
    except ImportError:
        log.warning("cannot order the shutdown: BentoML's arbiter has moved")
        return False
    if getattr(Arbiter, "__vqdiff_drain__", False):
        return True
    if "stop" not in vars(Arbiter) or not hasattr(CircusArbiter, "stop_controller_and_close_sockets"):
        log.warning("cannot order the shutdown: BentoML's arbiter has changed")
        return False
    close = CircusArbiter.stop_controller_and_close_sockets

    def stop(self):  # circus's own: stop the watchers (the workers drain), then the loop
        return CircusArbiter.stop(self)

    def stop_controller_and_close_sockets(self):
        try:
            close(self)
        finally:
            self.exit_stack.__exit__(None, None, None)  # the socket folder, usage tracking

    Arbiter.stop, Arbiter.stop_controller_and_close_sockets = stop, stop_controller_and_close_sockets
    Arbiter.__vqdiff_drain__ = True
    return True


# ---------------------------------------------------------------------------------------------- memory
async def _disconnected() -> dict:
    return {"type": "http.disconnect"}


class ReleaseBody:
    """Cut the link from BentoML's request object to the request body once the request is done.

    BentoML keeps the `starlette.requests.Request` of each request in a context variable; every timer
    scheduled during the request (``loop.call_at``) holds a copy of that context, and asyncio keeps a
    *cancelled* timer, context included, in its heap while a live timer due earlier sits in front of it
    (it drops cancelled ones from the front, and purges the heap only when more than half of over 100
    timers are cancelled). The aiohttp client of the model service schedules one
    per call, due after the model timeout (``VQDIFF_TIMEOUT_S`` x 0.75 = 90 s), and cancels it when the
    answer comes; BentoML's own request timer (never cancelled) keeps the other half of the heap live,
    so no purge happens. Each gateway worker therefore held on to the bodies (the upload, once joined by
    `service.guard.RequestGuard` and replayed through ``receive``) of all its requests of the last 90 s:
    measured with tracemalloc, 126-157 MB of live ``b"".join(chunks)`` bodies after 150 s of 8 clients
    (retained ``receive`` closures found through ``TimerHandle._context``), RSS 234 -> 945 MB.

    Installed after our other middlewares (so inside `RequestGuard`, whose replay of the body it
    wraps, and outside BentoML's ``ContextMiddleware``, which BentoML adds after ours and which keeps
    the request), this passes on a ``receive`` that forwards to
    the real one while the request runs and to a constant ``http.disconnect`` afterwards, so what is
    left of a finished request in those contexts is its scope and a few small objects."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        source = [receive]

        async def receive_while_running():
            return await source[0]()

        try:
            await self.app(scope, receive_while_running, send)
        finally:
            source[0] = _disconnected


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS)."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrim:
    """Give the heap's free pages back to the OS every ``interval_s`` seconds while requests come.

    Under load the model worker's RSS climbs by hundreds of MB and stays there (torch on the CPU): the
    adaptive batches have every size from 1 to 64 groups, so the activations (MBs to tens of MBs) have
    ever-different sizes; once glibc's dynamic mmap threshold has risen it serves them from the heap,
    whose holes are reused only in part and never returned. Measured (in one process, 30 batches of
    1-64 groups; benchmarks/bench_soak.py for the service): unchanged RSS 251 -> 787 MB;
    ``MALLOC_ARENA_MAX=2`` changes nothing (few threads allocate); a fixed ``MALLOC_MMAP_THRESHOLD_``
    bounds it (-> 278 MB) but costs 40-90 % more CPU (every activation page-faulted afresh);
    ``malloc_trim(0)`` after every batch peaks at 495 MB for +40 % CPU; every 2 s in the service, the
    model worker's peak went from 961 to 725 MB (8 clients, 120 s) at no measurable throughput cost.
    It is the allocator, not live data: after 40 such batches glibc's ``malloc_stats`` shows one arena
    with 471 MB from the system and 116 MB in use, and a 64-group batch needs only +110 MB at its peak.
    With the trim the torch worker's RSS swings (by up to 2x within seconds) without climbing; ONNX
    Runtime's own arena keeps the default engine's flat. Off with ``interval_s <= 0`` or without glibc.
    The trim runs in a thread (it holds the arena locks briefly)."""

    def __init__(self, app, *, interval_s: float = 2.0):
        self.app = app
        self.interval_s = float(interval_s)
        self._trim = _malloc_trim() if self.interval_s > 0 else None
        self.dirty = False
        self.trims = 0
        self.task: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self._trim is not None:
            self.dirty = True
            if self.task is None:
                self.task = asyncio.get_running_loop().create_task(self._run())
        elif scope["type"] == "lifespan":
            return await self.app(scope, receive, self._watch_shutdown(send))
        await self.app(scope, receive, send)

    def _watch_shutdown(self, send):
        async def watched(message):
            if message.get("type", "").startswith("lifespan.shutdown") and self.task is not None:
                self.task.cancel()
            await send(message)

        return watched

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            if self.dirty:  # requests since the last trim (an idle worker's heap does not grow)
                self.dirty = False
                await loop.run_in_executor(None, self._trim, 0)
                self.trims += 1
