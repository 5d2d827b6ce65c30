"""The in-process micro-batcher: concurrent requests' groups joined into one engine call.

A request's groups are cut into pieces of at most ``max_groups``; one task per operation takes the
queued pieces in arrival order and joins them up to ``max_groups`` per engine call, waiting up to
``max_wait_ms`` for more when the engine is idle (while it runs, the next batch queues by itself).
The engine runs in one thread of its own, one call at a time, so the event loop stays free. Each
call is counted in the Prometheus histograms ``vqdiff_batch_requests`` and ``vqdiff_batch_groups``.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np


@functools.cache
def _histograms():
    from prometheus_client import Histogram

    return (Histogram("vqdiff_batch_requests", "requests in one engine call", ["op"], buckets=(1, 2, 3, 4, 6, 8, 16, 32)),
            Histogram("vqdiff_batch_groups", "groups in one engine call", ["op"], buckets=(1, 4, 16, 32, 64, 128, 256)))


class MicroBatcher:
    """``await batcher.run(op, x)``: ``fns[op](batch)`` over the groups of ``x`` and whatever other
    requests queued meanwhile, the answer split back. ``fns`` map an array (B, ...) to an array or a
    tuple of arrays (or None) with B rows each."""

    def __init__(self, fns: dict, *, max_groups: int, max_wait_ms: float, metrics: bool = True):
        self.fns, self.max_groups, self.max_wait_s = fns, max(1, int(max_groups)), max(0.0, max_wait_ms) / 1e3
        self.metrics = _histograms() if metrics else None
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vqdiff-engine")  # one engine call at a time
        self.calls = 0

    async def run(self, op: str, x: np.ndarray):
        if op not in self._tasks:
            self._queues[op] = asyncio.Queue()
            self._tasks[op] = asyncio.get_running_loop().create_task(self._loop(op))
        if not len(x):
            raise ValueError("no groups to run")
        loop, request = asyncio.get_running_loop(), object()
        futures = [loop.create_future() for _ in range(0, len(x), self.max_groups)]
        for i, fut in enumerate(futures):
            self._queues[op].put_nowait((request, x[i * self.max_groups: (i + 1) * self.max_groups], fut))
        parts = await asyncio.gather(*futures)
        if isinstance(parts[0], tuple):
            return tuple(None if p[0] is None else np.concatenate(p) for p in zip(*parts, strict=True))
        return np.concatenate(parts)

    async def _loop(self, op: str) -> None:
        queue, held = self._queues[op], None
        loop = asyncio.get_running_loop()
        while True:
            batch = [held if held is not None else await queue.get()]
            held, size = None, len(batch[0][1])
            deadline = loop.time() + self.max_wait_s
            while size < self.max_groups:
                if queue.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                else:
                    item = queue.get_nowait()
                if size + len(item[1]) > self.max_groups:
                    held = item  # the first of the next batch
                    break
                batch.append(item)
                size += len(item[1])
            await self._call(op, batch)

    async def _call(self, op: str, batch: list) -> None:
        batch = [b for b in batch if not b[2].done()]  # a cancelled request's pieces are dropped
        if not batch:
            return
        x = batch[0][1] if len(batch) == 1 else np.concatenate([b[1] for b in batch])
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._pool, self.fns[op], x)
        except Exception as exc:  # noqa: BLE001 - the requests of this batch get the engine's error
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.calls += 1
        if self.metrics is not None:
            self.metrics[0].labels(op).observe(len({id(b[0]) for b in batch}))
            self.metrics[1].labels(op).observe(len(x))
        at = 0
        for _, piece, fut in batch:
            n = len(piece)
            part = tuple(None if o is None else o[at: at + n] for o in out) if isinstance(out, tuple) else out[at: at + n]
            at += n
            if not fut.done():
                fut.set_result(part)

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
