"""Entry point of ``bentoml serve`` (``bentofile.yaml``: ``service: "service.app:Gateway"``).

Run from the repository root: ``bentoml serve`` (or ``bentoml serve service.app:Gateway``). The
gateway depends on the model service, which BentoML starts beside it.

Stop order on SIGTERM (`service.lifecycle.Drain`, ``VQDIFF_DRAIN_S``): BentoML signals every worker at
once; the gateway workers drain their requests, and the model service keeps serving them until the
last gateway worker has exited (and BentoML keeps its unix socket until then).
"""

from .gateway import Gateway
from .lifecycle import Drain, HeapTrim, ReleaseBody, keep_sockets_until_workers_stop
from .model_service import VQDiffModel
from .settings import SETTINGS

keep_sockets_until_workers_stop()  # takes effect in the `bentoml serve` process
VQDiffModel.add_asgi_middleware(Drain, drain_s=SETTINGS.drain_s, callers=frozenset({Gateway.name}), margin_s=1.0)
VQDiffModel.add_asgi_middleware(HeapTrim, interval_s=SETTINGS.heap_trim_s)  # its RSS would climb under load
VQDiffModel.add_asgi_middleware(ReleaseBody)

__all__ = ["Gateway", "VQDiffModel"]
