"""The gateway service: file APIs in front of the batching model service.

=====================  =====================================================================
``POST /encode``       multipart ``file`` (.trk / .tck + ``reference`` / .trx) -> the ``.vqlat``
                       latents file; ``register=auto|off|<bundle>`` (default auto: registered
                       into the model's space, bundle recognised); ``summary=true`` -> JSON
                       summary instead (recognised bundle, residual, warnings)
``POST /decode``       multipart ``file`` (.vqlat) -> TRK (``format=tck|trx``) in the original
                       space; ``restore_points=true`` restores each streamline's point count
``POST /reconstruct``  multipart ``file`` (+ ``reference``) -> the reconstructed file (format of
                       the input unless ``format``), BUAN / MDF in ``X-VQDiff-*`` headers;
                       ``summary=true`` -> JSON figures instead
``GET /model``         model card: id / kind / hash, config, normalisation, backend / provider,
                       versions, limits
``/livez /readyz``     BentoML probes (ready once the model service is warmed up and answered)
``/metrics``           Prometheus (``bentoml_service_adaptive_batch_size`` for the batches)
=====================  =====================================================================

File responses carry ``X-VQDiff-Summary`` (compact JSON: counts, model, warnings, seconds) and
``X-VQDiff-Warning`` when there are warnings; every response carries ``Server-Timing`` (read,
model, write). Refusals are 4xx JSON (`service.errors`), 503 while the model service loads or is
overloaded; `service.guard` runs first (auth, body size, multipart checks). On SIGTERM the service
drains (`service.lifecycle.Drain`, ``VQDIFF_DRAIN_S``): requests in flight finish, new ones get 503 +
``Retry-After``, ``/readyz`` answers 503, and the model service stops after the gateway workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vqdiff.blas import limit_blas_threads

from .errors import ApiError
from .guard import ROUTES, RequestGuard
from .lifecycle import Drain, HeapTrim, ReleaseBody
from .model_service import VQDiffModel
from .settings import SETTINGS

with bentoml.importing():
    import anyio
    import numpy as np

    from vqdiff.quality import reconstruction_quality

    from . import pipeline

log = logging.getLogger("bentoml.vqdiff")

LATENTS_MEDIA_TYPE = "application/vnd.vqdiff.latents"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# An optional file field is typed ``Path`` with default None (defaults are not validated): BentoML 1.4
# cannot build the schema of ``Optional[Path]`` (unhashable FileSchema inside typing.Union) and does
# not treat ``Path | None`` as a file at all.
OptionalFile = Path


def _respond(summary: dict, timer, as_json: bool, content: bytes, filename: str, extra: dict | None = None) -> Response:
    """The file with its summary in headers, or (``summary=true``) the summary as JSON."""
    timer.mark("write")
    summary["seconds"] = timer.seconds
    headers = {"Server-Timing": timer.header()}
    if as_json:
        return JSONResponse(summary, headers=headers)
    media = LATENTS_MEDIA_TYPE if filename.endswith(".vqlat") else "application/octet-stream"
    headers.update({"Content-Disposition": f'attachment; filename="{_SAFE.sub("_", filename)}"',
                    "X-VQDiff-Summary": json.dumps(summary, separators=(",", ":")), **(extra or {})})
    if summary.get("warnings"):
        headers["X-VQDiff-Warning"] = ",".join(w["code"] for w in summary["warnings"])
    return Response(content, media_type=media, headers=headers)


def _unlink(*paths: Path | None) -> None:
    for p in paths:
        if p is not None:
            Path(p).unlink(missing_ok=True)


@bentoml.service(
    name="vqdiff",
    workers=SETTINGS.gateway_workers,
    traffic={"timeout": SETTINGS.timeout_s},  # the concurrency limit is the guard's (503 + Retry-After)
)
class Gateway:
    model = bentoml.depends(VQDiffModel)

    def __init__(self) -> None:
        self._view: pipeline.ModelView | None = None
        self._lock = asyncio.Lock()
        self._limiter: anyio.CapacityLimiter | None = None
        limit_blas_threads()  # one BLAS thread per request thread, scipy's included (vqdiff.blas)
        log.info("gateway worker warmed up in %.1f s", pipeline.warm_up())

    # ------------------------------------------------------------------ model service
    async def view(self) -> pipeline.ModelView:
        """The served model's card, fetched once from the model service (which is primed then)."""
        if self._view is None:
            async with self._lock:
                if self._view is None:
                    remote = hasattr(self.model, "to_async")
                    text = await self.model.to_async.info("card") if remote else self.model.info()
                    view = pipeline.ModelView(json.loads(text))
                    if remote:
                        await self._prime(view)
                    self._view = view
        return self._view

    async def _prime(self, view: pipeline.ModelView, rounds: int = 12, width: int = 3) -> None:
        """Take BentoML's batch dispatchers through their start-up calibration with tiny concurrent
        requests, so that real requests never wait in it (a lone request would wait seconds)."""
        t0 = time.perf_counter()
        x = np.zeros((1, 3, 64, 64), np.float32)
        z = np.zeros((1, *view.latent_shape), np.float32)
        engine = self._engine()
        for _ in range(rounds):
            await asyncio.gather(*(engine.encode(x) for _ in range(width)), *(engine.decode(z) for _ in range(width)))
        await self._cpu(pipeline.warm_up_registration, view)  # the first request must not pay for it
        log.info("model dispatchers and registration primed in %.1f s", time.perf_counter() - t0)

    @bentoml.on_startup
    def _start_priming(self) -> None:
        """Fetch the card and prime the dispatchers as soon as the model service is up (every worker)."""
        self._primer = asyncio.get_running_loop().create_task(self._prime_when_up())

    async def _prime_when_up(self) -> None:
        while self._view is None:
            try:
                await self.view()
            except Exception as exc:  # the model service is still loading / warming up
                log.debug("model service not ready yet: %s", exc)
                await asyncio.sleep(0.5)

    async def __is_ready__(self) -> bool:
        return self._view is not None

    def _engine(self) -> pipeline.RemoteEngine:
        client = self.model.to_async if hasattr(self.model, "to_async") else self.model
        return pipeline.RemoteEngine(client, chunk=4 * SETTINGS.max_batch_groups)

    async def _cpu(self, fn, *args):
        """Parsing, canonicalisation and writing: worker threads, at most VQDIFF_GATEWAY_THREADS at once."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(SETTINGS.gateway_threads)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _run(self, endpoint: str, work, *uploads: Path | None) -> Response:
        """``await work(view)``; map refusals to 4xx JSON; always remove the uploaded files."""
        try:
            if self._view is None:
                raise ApiError(503, "model_loading", "the model service is still loading (or failed to: see the "
                               "server log); GET /readyz answers 200 once it is ready")
            return await work(self._view)
        except ApiError as err:
            log.info("%s refused (%d %s): %s", endpoint, err.status, err.reason, err.message[:300])
            return err.to_response()
        except BentoMLException as exc:
            code = int(getattr(exc, "error_code", 500) or 500)
            if code < 500:  # the model service refused what the gateway sent: our bug, not the caller's
                log.error("%s: the model service refused the gateway's request (%d): %s", endpoint, code, exc)
                return ApiError(500, "internal_error", "internal error; see the server log").to_response()
            log.warning("%s: model service error (%d): %s", endpoint, code, exc)  # timed out, overloaded, gone
            return ApiError(503, "model_unavailable", "the model service did not answer in time; retry later",
                            detail=str(exc)[:300]).to_response()
        finally:
            _unlink(*uploads)

    @staticmethod
    def _read(file: Path, reference: Path | None, view: pipeline.ModelView, register: str):
        bundle, sha = pipeline.read_bundle(file, reference, max_streamlines=SETTINGS.max_streamlines,
                                           max_points=SETTINGS.max_points)
        return (bundle, *view.prepare_encode(bundle, sha, register))

    # ------------------------------------------------------------------ APIs
    @bentoml.api(route="/encode")
    async def encode(self, file: Path, reference: OptionalFile = None, register: str = "auto",
                     summary: bool = False) -> Path:
        """Tractogram (TRK; TCK with ``reference``; TRX) -> versioned latents file (.vqlat). ``register``:
        "auto" (into the model's space, bundle recognised), "off" (already in model space) or a bundle name."""

        async def work(view):
            timer = pipeline.Timer()
            bundle, x, state = await self._cpu(self._read, file, reference, view, register)
            timer.mark("read")
            latents, indices = await self._engine().encode(x)
            timer.mark("model")

            def finish():
                lat = view.pipeline.assemble_latents(state, latents, indices)
                data = lat.to_bytes()
                info = {"streamlines": lat.n_streamlines, "groups": lat.n_groups, "source_format": bundle.source_format,
                        "model": view.model_info, "latents_bytes": len(data), "latent_shape": list(latents.shape),
                        "registration": state.registration, "warnings": state.warnings}
                return _respond(info, timer, summary, data, f"{bundle.name or 'bundle'}.vqlat")

            return await self._cpu(finish)

        return await self._run("encode", work, file, reference)

    @bentoml.api(route="/decode")
    async def decode(self, file: Path, format: str = "trk", restore_points: bool = False,
                     summary: bool = False) -> Path:
        """Latents file -> tractogram (TRK, or TCK / TRX) in the caller's original space and order."""

        async def work(view):
            timer = pipeline.Timer()
            fmt = pipeline.output_format(format, "trk")
            lat = await self._cpu(lambda: pipeline.read_latents(file, view, max_groups=SETTINGS.max_groups,
                                                                 max_points=SETTINGS.max_points))
            timer.mark("read")
            groups = await self._engine().decode(lat.latents)
            timer.mark("model")

            def finish():
                bundle = view.assemble_bundle(lat, groups, restore_points=restore_points)
                data = pipeline.write_bundle(bundle, fmt)
                info = {"streamlines": len(bundle), "groups": lat.n_groups, "format": fmt, "model": view.model_info,
                        "bytes": len(data), "warnings": []}
                return _respond(info, timer, summary, data, f"{bundle.name or 'bundle'}.{fmt}")

            return await self._cpu(finish)

        return await self._run("decode", work, file)

    @bentoml.api(route="/reconstruct")
    async def reconstruct(self, file: Path, reference: OptionalFile = None, register: str = "auto",
                          format: str | None = None, summary: bool = False) -> Path:
        """Tractogram -> its reconstruction through the model, with BUAN and MDF figures."""

        async def work(view):
            timer = pipeline.Timer()
            bundle, x, state = await self._cpu(self._read, file, reference, view, register)
            fmt = pipeline.output_format(format, bundle.source_format)
            timer.mark("read")
            engine = self._engine()
            latents, indices = await engine.encode(x)
            groups = await engine.decode(latents)
            timer.mark("model")

            def finish():
                lat = view.pipeline.assemble_latents(state, latents, indices)
                recon = view.assemble_bundle(lat, groups, restore_points=True)
                figures = reconstruction_quality(bundle, recon)
                timer.mark("quality")
                data = pipeline.write_bundle(recon, fmt)
                info = {"streamlines": len(recon), "groups": lat.n_groups, "format": fmt, "model": view.model_info,
                        "quality": figures, "registration": state.registration, "warnings": state.warnings}
                return _respond(info, timer, summary, data, f"{bundle.name or 'bundle'}_recon.{fmt}", {
                    "X-VQDiff-BUAN": str(figures["buan_t5"]), "X-VQDiff-Mean-MDF-mm": str(figures["mean_mdf_mm"])})

            return await self._cpu(finish)

        return await self._run("reconstruct", work, file, reference)


async def _model_card(request: Request) -> Response:
    view = bentoml.get_current_service()._view
    if view is None:
        return ApiError(503, "model_loading", "the model service is still loading (or failed to: see the server "
                        "log); GET /readyz answers 200 once it is ready").to_response()
    return JSONResponse({**view.public_card(), "service": SETTINGS.public(),
                         "formats": {"input": ["trk", "tck", "trx"], "output": list(pipeline.OUTPUT_FORMATS)}})


Gateway.mount_asgi_app(Starlette(routes=[Route("/model", _model_card, methods=["GET"])]), path="/")
# Outermost first: while draining, new API requests are refused before their body is read.
Gateway.add_asgi_middleware(Drain, drain_s=SETTINGS.drain_s, refuse=frozenset(ROUTES))
Gateway.add_asgi_middleware(RequestGuard, max_upload_bytes=SETTINGS.max_upload_bytes, api_token=SETTINGS.api_token,
                            max_in_flight=-(-SETTINGS.max_concurrency // SETTINGS.gateway_workers))
Gateway.add_asgi_middleware(HeapTrim, interval_s=SETTINGS.heap_trim_s)
Gateway.add_asgi_middleware(ReleaseBody)  # last of ours: inside RequestGuard's body replay, outside BentoML's
# ContextMiddleware (added after ours), so the request it keeps no longer leads to the body once done
