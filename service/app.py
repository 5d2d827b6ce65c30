"""Entry point of ``bentoml serve`` (``bentofile.yaml``: ``service: "service.app:Gateway"``).

Run from the repository root: ``bentoml serve`` (or ``bentoml serve service.app:Gateway``). The
gateway depends on the model service, which BentoML starts beside it.
"""

from .gateway import Gateway
from .model_service import VQDiffModel

__all__ = ["Gateway", "VQDiffModel"]
