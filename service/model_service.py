"""The model service: group-level encode / decode with adaptive batching across requests.

Its APIs take and return raw ``.npy`` bodies (`service.npy`): ``encode_groups`` maps normalised
groups ``(B, 3, 64, 64)`` float32 to a structured array ``(B,)`` with fields ``latents``
``(D, 16, 16)`` float32 and, for quantising bottlenecks, ``indices`` ``(16, 16)`` int64;
``decode_groups`` maps latents ``(B, D, 16, 16)`` back to groups. BentoML's dispatcher merges the
groups of concurrent requests (from every gateway worker) into one batch of at most
``VQDIFF_MAX_BATCH_GROUPS`` groups, splitting large requests, and reports each batch's request
count in ``bentoml_service_adaptive_batch_size``. ``info`` returns the model card as JSON text.

Only the gateway calls this service (over a local socket); it refuses pickle bodies anyway.
"""

from __future__ import annotations

import json
import logging
import time

import bentoml

from .guard import RefusePickle
from .npy import NpyGroups, NpyOut
from .settings import SETTINGS

with bentoml.importing():
    import numpy as np

log = logging.getLogger("bentoml.vqdiff")


def cap_batch_wait(max_wait_s: float) -> bool:
    """Bound the time BentoML's dispatcher holds a request waiting for companions.

    The dispatcher learns its wait as the mean queueing time of recent batches; after a burst that
    mean is large and a lone request then waits for companions that never come (measured: 55 ms of
    model time became 330 ms for minutes after 16 clients stopped). Under load, batches form while
    the previous batch runs, so a small cap keeps the batching and removes the idle-time penalty.
    Wraps ``Optimizer.trigger_refresh`` of BentoML 1.4 (checked: skipped with a warning if absent).
    """
    try:
        from bentoml._internal.marshal.dispatcher import Optimizer
    except ImportError:
        log.warning("cannot cap the batching wait: BentoML's dispatcher has moved")
        return False
    original = Optimizer.trigger_refresh
    if getattr(original, "__vqdiff_cap__", None) is not None:
        original = original.__wrapped__

    def trigger_refresh(self):
        original(self)
        self.wait = min(self.wait, max_wait_s)

    trigger_refresh.__wrapped__, trigger_refresh.__vqdiff_cap__ = original, max_wait_s
    Optimizer.trigger_refresh = trigger_refresh
    return True


def _bento_model_ref():
    """The BentoML store model named by ``VQDIFF_MODEL_TAG`` (packed into bentos at build time)."""
    return bentoml.models.BentoModel(SETTINGS.model_tag) if SETTINGS.model_tag else None


@bentoml.service(
    name="vqdiff-model",
    resources={"gpu": 1},  # one GPU when there is one; the engine falls back to the CPU otherwise
    workers=1,  # one queue: every gateway worker's groups meet in the same batches
    threads=1,
    traffic={"timeout": SETTINGS.model_timeout_s},
    # BentoML >= 1.4.31 replaces the caller's session every max_requests calls / max_age seconds and
    # closes the old one under in-flight requests ("Server disconnected", bentoml/BentoML#5540):
    runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
    logging={"access": {"enabled": False}},
)
class VQDiffModel:
    bento_model = _bento_model_ref()

    def __init__(self) -> None:
        from .backend import model_card, open_engine, resolve_model_dir, warm_up

        t0 = time.perf_counter()
        self.ready = False
        cap_batch_wait(SETTINGS.max_batch_wait_ms / 1e3)
        self.path = resolve_model_dir(SETTINGS.model_path, self.bento_model)
        self.engine = open_engine(self.path, backend=SETTINGS.backend, device=SETTINGS.device,
                                  threads=SETTINGS.threads)
        lat, idx = self.engine.encode_with_indices(np.zeros((1, 3, 64, 64), np.float32))
        fields = [("latents", "<f4", lat.shape[1:])]
        if idx is not None:
            fields.append(("indices", "<i8", idx.shape[1:]))
        self.encoded_dtype = np.dtype(fields)
        warm_s = warm_up(self.engine, sizes=(1, min(SETTINGS.max_batch_groups, 64)))
        card = model_card(self.path, self.engine)
        card["has_indices"] = idx is not None
        card["warmup_s"] = round(warm_s, 3)
        card["batching"] = {"max_batch_groups": SETTINGS.max_batch_groups, "max_latency_ms": SETTINGS.max_latency_ms,
                            "max_batch_wait_ms": SETTINGS.max_batch_wait_ms}
        self.card_json = json.dumps(card)
        self.ready = True
        log.info("model %s (%s) ready on %s/%s, engine %s, in %.1f s%s", card["model"].get("id"), self.path,
                 card["backend"], card["provider"], card.get("engine_variant") or card["backend_name"],
                 time.perf_counter() - t0,
                 f" ({card['selection']['reason']})" if card.get("selection") else "")

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_groups, max_latency_ms=SETTINGS.max_latency_ms)
    def encode_groups(self, groups: NpyGroups, /) -> NpyOut:
        latents, indices = self.engine.encode_with_indices(groups)
        out = np.empty(len(latents), dtype=self.encoded_dtype)
        out["latents"] = latents
        if indices is not None:
            out["indices"] = indices
        return out

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_groups, max_latency_ms=SETTINGS.max_latency_ms)
    def decode_groups(self, latents: NpyGroups, /) -> NpyOut:
        return np.ascontiguousarray(self.engine.decode_groups(latents), dtype=np.float32)

    @bentoml.api
    def info(self, what: str = "card", /) -> str:
        """The model card (JSON text; not a dict, so that nothing is pickled on the way back)."""
        return self.card_json


VQDiffModel.add_asgi_middleware(RefusePickle)
