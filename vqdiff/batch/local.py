"""The local runner of a batch job: threads prepare files while this thread runs the engine on full
batches and one writer thread finishes them."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from .stages import Batcher, JobSpec, Prepared, engine_call, finish, prepare
from .tasks import BatchTask

log = logging.getLogger(__name__)


def run_local(spec: JobSpec, codec, tasks: list[BatchTask], on_record: Callable[[dict, str], None], *,
              workers: int = 2, prefetch: int | None = None) -> None:
    """Run ``tasks`` here: ``workers`` threads prepare files while this thread runs the engine on
    full batches and one writer thread finishes them. ``on_record(record, outcome)`` is called here."""
    batcher = Batcher(partial(engine_call, codec, spec.kind), spec.batch_size)
    prefetch = prefetch or 2 * workers + 2
    todo, pending, writes = iter(tasks), deque(), deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vqdiff-prepare")
    writer = ThreadPoolExecutor(1, thread_name_prefix="vqdiff-write")

    def submit_ready(ready):
        for (task, item), outs in ready:
            writes.append(writer.submit(finish, spec, task, item, outs))

    def drain(wait: bool = False):
        while writes and (wait or writes[0].done()):
            on_record(*writes.popleft().result())

    try:
        while True:
            while len(pending) < prefetch and (task := next(todo, None)) is not None:
                pending.append((task, pool.submit(prepare, spec, task)))
            if not pending:
                break
            task, fut = pending.popleft()
            res = fut.result()
            if isinstance(res, Prepared):
                submit_ready(batcher.add((task, res), res.x))
            else:
                on_record(*res)
            drain()
        submit_ready(batcher.flush())
        drain(wait=True)
    finally:  # on an error or Ctrl-C: drop what has not started, let started writes finish (atomic anyway)
        pool.shutdown(cancel_futures=True)
        writer.shutdown(cancel_futures=True)
