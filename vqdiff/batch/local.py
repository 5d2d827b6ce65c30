"""The local runner of a batch job: threads (or processes) prepare files while this thread runs the
engine on full batches and one writer thread finishes them.

Threads share this interpreter's lock. Canonicalisation is mostly numpy (the lock is released in
its array work), but registering another subject's bundle (`vqdiff.slr`'s L-BFGS-B) is mostly
Python, so thread workers prepare such bundles at about one core in all. ``processes=True``
prepares in worker processes instead (forkserver: clean children, never forks of this process and
its engine threads). Measured on 2 cores (ort-fp32, 2 workers, end to end against the engine
alone, best of 3): other subjects' bundles (AFQ x 20 subjects) 0.23 with threads -> 0.31 with
processes; subject01 x 10, already in model space, 0.65 -> 0.54 (the processes' start and the
transfer of the groups cost more than they save there). Threads stay the default.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path

from .stages import Batcher, JobSpec, Prepared, engine_call, finish, prepare
from .tasks import BatchError, BatchTask

log = logging.getLogger(__name__)
_SPEC: list[JobSpec] = []  # a prepare process's job (set once by its initializer)
PRELOAD = ["vqdiff.batch.stages", "vqdiff.codec", "vqdiff.registration", "vqdiff.io", "vqdiff.blas"]
# Look-ahead of the prepare workers: files submitted before the engine needs them. The engine thread
# refills it only between engine calls, so it must cover a batch and more: with 2 * workers + 2
# files (subject01 x 10, 2 cores) the engine waited on preparation 0.4-0.5 s of a 5 s job, 0.1 s
# with 16. Bounded by the inputs' bytes too, so that large files do not pile up in memory.
PREFETCH_FILES = 16
PREFETCH_BYTES = 256 << 20


def _init_process(spec: JobSpec) -> None:
    """A prepare process: its job (its pipeline built once), every BLAS on one thread."""
    from vqdiff.blas import limit_blas_threads

    limit_blas_threads()
    _SPEC[:] = [spec]
    spec.pipeline  # noqa: B018  (the templates are read once per process, not per file)


def _prepare_here(task: BatchTask):
    return prepare(_SPEC[0], task)


def _main_is_importable() -> bool:
    """Whether child processes can re-import ``__main__`` (not a script read from stdin)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return path is None or Path(path).is_file()


def prepare_pool(spec: JobSpec, workers: int, processes: bool):
    """(executor, submit(task) -> future of `prepare`): ``workers`` threads or processes."""
    if processes and not _main_is_importable():
        log.warning("preparing in threads: worker processes cannot start from a script read from stdin")
        processes = False
    if not processes:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="vqdiff-prepare")
        return pool, partial(pool.submit, prepare, spec)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_process, initargs=(spec,))
    return pool, partial(pool.submit, _prepare_here)


def run_local(spec: JobSpec, codec, tasks: list[BatchTask], on_record: Callable[[dict, str], None], *,
              workers: int = 2, processes: bool = False, prefetch: int | None = None) -> None:
    """Run ``tasks`` here: ``workers`` threads (``processes``: worker processes) prepare files while
    this thread runs the engine on full batches and one writer thread finishes them.
    ``on_record(record, outcome)`` is called here. A worker process that dies (killed, out of
    memory) stops the job with a `BatchError`; what was written so far is kept and a rerun resumes."""
    batcher = Batcher(partial(engine_call, codec, spec.kind, fidelity=spec.fidelity), spec.batch_size)
    prefetch = prefetch or max(PREFETCH_FILES, 2 * workers + 2)
    todo, pending, writes = iter(tasks), deque(), deque()
    pending_bytes = 0

    def size(task: BatchTask) -> int:
        try:
            return Path(task.input).stat().st_size
        except OSError:
            return 0  # prepare reports it

    pool, submit = prepare_pool(spec, workers, processes)
    writer = ThreadPoolExecutor(1, thread_name_prefix="vqdiff-write")

    def submit_ready(ready):
        for (task, item), outs in ready:
            writes.append(writer.submit(finish, spec, task, item, outs))

    def drain(wait: bool = False):
        while writes and (wait or writes[0].done()):
            on_record(*writes.popleft().result())

    try:
        while True:
            while (len(pending) < workers or (len(pending) < prefetch and pending_bytes < PREFETCH_BYTES)) \
                    and (task := next(todo, None)) is not None:
                nbytes = size(task)
                pending.append((task, submit(task), nbytes))
                pending_bytes += nbytes
            if not pending:
                break
            task, fut, nbytes = pending.popleft()
            pending_bytes -= nbytes
            try:
                res = fut.result()
            except BrokenProcessPool as exc:
                raise BatchError(f"a prepare worker process died while {task.rel} was being prepared ({exc}); "
                                 "the files written so far are kept: run the job again to resume") from exc
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
