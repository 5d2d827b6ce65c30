"""The in-process micro-batcher: a request's groups, cut into pieces of at most ``max_groups``, are joined
with other requests' pieces in arrival order up to ``max_groups`` per engine call (an idle engine waits up to
``max_wait_ms`` for more; a busy one batches what queued meanwhile). The engine runs in a thread of its own,
one call (one job: the service's encode decodes too) at a time; counted in ``vqdiff_batch_requests`` / ``_groups``."""

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
        queue, held, loop = self._queues[op], None, asyncio.get_running_loop()
        while True:
            batch = [held or await queue.get()]
            held, size, deadline = None, len(batch[0][1]), loop.time() + self.max_wait_s
            while size < self.max_groups:
                try:
                    item = queue.get_nowait() if queue.qsize() else await asyncio.wait_for(queue.get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
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
            for fut in (b[2] for b in batch if not b[2].done()):
                fut.set_exception(exc)
            return
        self.calls += 1
        if self.metrics is not None:
            self.metrics[0].labels(op).observe(len({id(b[0]) for b in batch}))
            self.metrics[1].labels(op).observe(len(x))
        at = 0
        for _, piece, fut in batch:
            rows = slice(at, at + len(piece))
            at += len(piece)
            if not fut.done():
                fut.set_result(tuple(None if o is None else o[rows] for o in out) if isinstance(out, tuple) else out[rows])

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
