"""The batch job on Ray Data: the same three stages as `vqdiff.batch.local.run_local`.

``prepare`` runs as CPU tasks (one file per row), the engine in an actor pool (one actor per GPU
when the cluster has GPUs, ``num_gpus=1`` each; else CPU actors), ``finish`` (the atomic writes) as
CPU tasks; the driver collects the index records. Every node must see IN_DIR, OUT_DIR and the model
directory at the same paths (a shared file system) and have vqdiff installed (``pip install
vqdiff[ray]``). Ray is imported lazily: the rest of vqdiff never needs it.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from .model import load_codec
from .stages import Batcher, JobSpec, Prepared, engine_call, finish, prepare
from .tasks import BatchError, BatchTask

log = logging.getLogger(__name__)
FILES_PER_CALL = 32  # rows (files) handed to an engine actor at once
_PREPARE_ENV = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # numpy BLAS


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise BatchError("--ray needs Ray Data: pip install 'vqdiff[ray]' (or 'ray[data]>=2.9')") from exc
    return ray


def init_ray(ray, address: str) -> bool:
    """Connect to (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``) or start (``"local"``) Ray.
    Returns True when this call started or joined it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address == "local":
        ray.init(address="local", include_dashboard=False, **kwargs)
    else:
        ray.init(address=None if address == "auto" else address, **kwargs)
    return True


def _prepare_row(row: dict, spec: JobSpec) -> dict:
    task = BatchTask(**json.loads(row["task"]))
    res = prepare(spec, task)
    if isinstance(res, Prepared):  # our own object between our own workers, as Ray would pickle it anyway
        return {"task": row["task"], "item": pickle.dumps(res, protocol=5), "record": "", "outcome": ""}
    return {"task": row["task"], "item": None, "record": json.dumps(res[0]), "outcome": res[1]}


class _EngineActor:
    """Holds one engine; each call runs the groups of its rows in full batches (`Batcher`)."""

    def __init__(self, spec: JobSpec):
        import ray

        device = spec.device or ("cuda" if ray.get_gpu_ids() else None)  # Ray sets CUDA_VISIBLE_DEVICES
        self.spec = spec
        self.codec = load_codec(spec.model, backend=spec.backend, device=device, threads=spec.threads,
                                batch_size=spec.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batcher = Batcher(lambda x: engine_call(self.codec, self.spec.kind, x, self.spec.fidelity),
                          self.spec.batch_size)
        items, outputs = batch["item"].copy(), np.empty(len(batch["task"]), dtype=object)
        done = []
        for i, blob in enumerate(batch["item"]):
            if blob is not None:
                item = pickle.loads(blob)
                done += batcher.add(i, item.x)
                item.x = None  # finish does not need the engine input: do not ship it on
                items[i] = pickle.dumps(item, protocol=5)
        for j, outs in done + batcher.flush():
            outputs[j] = pickle.dumps(outs, protocol=5)
        return {**batch, "item": items, "outputs": outputs}


def _finish_row(row: dict, spec: JobSpec) -> dict:
    if row["item"] is None:
        return {"record": row["record"], "outcome": row["outcome"]}
    item = pickle.loads(row["item"])
    rec, outcome = finish(spec, BatchTask(**json.loads(row["task"])), item, pickle.loads(row["outputs"]))
    return {"record": json.dumps(rec), "outcome": outcome}


def run_ray(spec: JobSpec, tasks: list[BatchTask], on_record: Callable[[dict, str], None], *,
            address: str = "auto", actors: int | None = None, files_per_call: int = FILES_PER_CALL,
            progress: bool = True) -> None:
    """Run ``tasks`` on Ray Data; ``on_record(record, outcome)`` is called on the driver for every file."""
    if not tasks:
        return
    ray = import_ray()
    started = init_ray(ray, address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ctx.verbose_stats_logs = False
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        n_actors = actors or max(gpus, 1)
        actor_res = {"num_gpus": 1} if gpus else {"num_cpus": spec.threads or 1}
        log.info("ray: %d engine actor(s) %s over %d file(s)", n_actors, actor_res, len(tasks))
        rows = [{"task": json.dumps(asdict(t))} for t in tasks]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(64, 4 * int(resources.get("CPU", 1)))))
        # prepare's own runtime_env (single-threaded BLAS) also keeps Ray Data from fusing it into the
        # engine actor, where it would not overlap with inference
        ds = ds.map(_prepare_row, fn_kwargs={"spec": spec}, runtime_env={"env_vars": _PREPARE_ENV})
        ds = ds.map_batches(_EngineActor, fn_constructor_kwargs={"spec": spec}, batch_size=files_per_call,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n_actors), **actor_res)
        ds = ds.map(_finish_row, fn_kwargs={"spec": spec})
        for row in ds.iter_rows():
            on_record(json.loads(row["record"]), row["outcome"])
    finally:
        if started:
            ray.shutdown()
