"""numpy's and scipy's BLAS on one thread, in the processes that prepare bundles beside an engine.

Preparation makes many small BLAS / LAPACK calls: canonicalisation's eigen-solves through numpy's
OpenBLAS, registration's L-BFGS-B (`vqdiff.slr`) through scipy's own OpenBLAS, a second library.
With more than one BLAS thread each such call wakes threads that spin on cores the engine and the
other requests need. Measured on 2 cores (`benchmarks/bench_service.py --data
<crosssubject/afq_browser>`, 4 clients): with scipy's BLAS left on 2 threads the service answered
13 requests/s of cross-subject bundles (the gateways spent half their time inside L-BFGS-B), with
it on one 38. A threadpoolctl limit covers only the libraries loaded when it is set, so every
function here loads scipy's first.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)
_CONTROLLER: list = []


def _load_scipy_blas() -> None:
    import scipy.optimize  # noqa: F401  (loads scipy's OpenBLAS, which L-BFGS-B calls)


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover - a dependency of the package
        if "OPENBLAS_NUM_THREADS" not in os.environ:
            log.warning("threadpoolctl is not installed: set OPENBLAS_NUM_THREADS=1 (or pip install threadpoolctl), "
                        "else preparation may crawl beside the engine on a busy host")
        return None
    _load_scipy_blas()
    return threadpoolctl


def limit_blas_threads() -> None:
    """Every BLAS of this process on one thread from now on (a service worker that only prepares)."""
    if (tpc := _threadpoolctl()) is not None:
        tpc.threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def single_threaded_blas():
    """Every BLAS of this process on one thread inside the context (a batch job, a benchmark)."""
    tpc = _threadpoolctl()
    with contextlib.nullcontext() if tpc is None else tpc.threadpool_limits(limits=1, user_api="blas"):
        yield


def one_blas_thread():
    """`single_threaded_blas` for one call of a library function (`vqdiff.slr.fit`) in a process that
    may not have limited its BLAS: L-BFGS-B's tiny calls crawl with several threads. The
    threadpoolctl controller is made once (a scan of the loaded libraries costs milliseconds).
    Leaving the context restores the process's own thread counts, which on a busy host wakes
    spinning threads again: processes that register many bundles call `limit_blas_threads` or run
    inside `single_threaded_blas` (the gateway and batch encoding do)."""
    if not _CONTROLLER:
        tpc = _threadpoolctl()
        if tpc is None:
            return contextlib.nullcontext()
        _CONTROLLER.append(tpc.ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1, user_api="blas")
