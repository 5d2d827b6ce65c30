"""What every benchmark here shares: the machine's description, warm-up + best-of timing, and the
load-average watch that flags a contended run.

Rules every ``bench_*.py`` follows (timings on a shared machine are noisy):

- its baseline runs in the same process, in the same run, interleaved or before and after;
- everything timed is warmed up first (imports, allocations, kernel selection);
- the load average is printed before and after, and a run where it exceeded the cores the
  benchmark uses is flagged: a ``WARNING`` line and ``"contended": true`` in its JSON.

Import it as ``from _common import ...`` (the script's folder is on ``sys.path``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ISA = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
       "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_summary() -> dict:
    """CPU model, cores and the ISA flags that decide which kernels run (`engine_cache.cpu_info`'s reading)."""
    from vqdiff.export.engine_cache import cpu_info

    info = cpu_info()
    flags = set(info["flags"])
    return {"model": info["model"], "cores": info["cores"], "isa": [f for f in ISA if f in flags],
            "avx512": any(f.startswith("avx512") for f in flags), "amx": any(f.startswith("amx") for f in flags)}


def add_served_model_args(p) -> None:
    """``--model``, ``--dev-model`` and ``--data`` of the benchmarks that serve a model over HTTP."""
    repo = Path(__file__).resolve().parents[1]
    p.add_argument("--model", help="checkpoint or export directory (default: $VQDIFF_MODEL or models/default)")
    p.add_argument("--dev-model", action="store_true", help="serve a random-weight model (no trained model needed)")
    p.add_argument("--data", default=os.environ.get("VQDIFF_SHARED_DATA", str(repo.parent / "shared" / "data")) +
                   "/subject01", help="folder of .trk bundles")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class LoadWatch:
    """Load average before / after a run and whether it exceeded the cores the benchmark uses.

    >>> watch = LoadWatch(cores_used=2)      # at the start: prints the load average
    >>> ...                                   # the benchmark
    >>> info = watch.finish()                 # prints it again, and a WARNING when contended
    """

    def __init__(self, cores_used: int | None = None, *, quiet: bool = False):
        self.cores_used = int(cores_used or os.cpu_count() or 1)
        self.before = load_average()
        self.t0 = time.perf_counter()
        if not quiet:
            print(f"load average before: {self.before} (the benchmark uses {self.cores_used} of "
                  f"{os.cpu_count()} cores)", flush=True)

    def finish(self, *, quiet: bool = False) -> dict:
        after = load_average()
        peak = max([self.before[0] if self.before else 0.0, after[0] if after else 0.0])
        contended = peak > self.cores_used
        info = {"load_avg_before": self.before, "load_avg_after": after, "cores_used": self.cores_used,
                "cores": os.cpu_count(), "contended": contended, "wall_s": round(time.perf_counter() - self.t0, 1)}
        if not quiet:
            print(f"load average after: {after}", flush=True)
        if contended:
            print(f"WARNING: contended run: the load average ({peak:.2f}) exceeded the {self.cores_used} cores "
                  "this benchmark uses; other work shared the CPU, so compare only ratios measured in this run",
                  file=sys.stderr if quiet else sys.stdout, flush=True)
        return info


def best_time(fn, repeats: int, *, warmup: int = 1) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def interleaved_best(fns: dict, repeats: int, *, warmup: int = 1) -> dict[str, float]:
    """Best seconds of each of several callables, timed in interleaved rounds (a burst of background
    load then hits every one alike), after ``warmup`` untimed calls of each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def requests_of(x, batch: int, n: int) -> list:
    """The first ``n`` groups of ``x`` as contiguous requests of ``batch`` groups."""
    import numpy as np

    return [np.ascontiguousarray(x[s : s + batch]) for s in range(0, n, batch)]


def roundtrip_all(engine, xs):
    """A callable that encodes and decodes every request of ``xs`` with ``engine``."""
    def run():
        for b in xs:
            lat, _ = engine.encode_with_indices(b)
            engine.decode_groups(lat)

    return run
