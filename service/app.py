"""The vqdiff service (``bentoml serve`` from the repository root): ``POST /encode /decode /reconstruct``
(README), ``GET /model``, BentoML's probes and ``/metrics``. Each worker owns a codec (`vqdiff.export.served`)
and a `MicroBatcher` joining its concurrent requests' groups into engine calls. A route is: read the upload
(`service.uploads`, worker threads), the engine (``self.batcher.run``), assemble and write (worker threads);
refusals are 4xx JSON (`service.errors`); the ASGI middlewares (`service.guard`, `service.lifecycle`) run first."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError, refusal
from .guard import ROUTES, UPLOAD_NAMES, RequestGuard
from .lifecycle import Drain
from .settings import SETTINGS, gpu_host

with bentoml.importing():
    import anyio

    from vqdiff import analysis, filesteps
    from vqdiff.analysis.norms import Norms
    from vqdiff.analysis.scoring import score_latents
    from vqdiff.blas import limit_blas_threads
    from vqdiff.codec import REGISTER_MODES
    from vqdiff.errors import VQDiffError
    from vqdiff.export.served import model_card, open_codec, warm_up
    from vqdiff.memory import trim_heap
    from vqdiff.segment import MODES as SEGMENT_MODES
    from vqdiff.subject import Subject

    from . import uploads
    from .batcher import MicroBatcher

log = logging.getLogger("bentoml.vqdiff")

LATENTS_MEDIA_TYPE = "application/vnd.vqdiff.latents"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
OptionalFile = Path  # with default None: BentoML 1.4 cannot build ``Optional[Path]`` nor sees ``Path | None``


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


def _names(ctx) -> dict[str, str]:  # the client's file names, field -> name (`service.guard`)
    return getattr(ctx.request.state, UPLOAD_NAMES, {})


@bentoml.service(
    name="vqdiff",
    workers=SETTINGS.workers,
    **({"resources": {"gpu": 1}} if gpu_host(SETTINGS.device) else {}),  # a GPU host's one worker; CPU hosts: none
    traffic={"timeout": SETTINGS.timeout_s},  # the concurrency limit is the guard's (503 + Retry-After)
)
class VQDiff:
    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag) if SETTINGS.model_tag else None  # packed at build

    def __init__(self) -> None:
        t0 = time.perf_counter()
        limit_blas_threads()  # one BLAS thread per request thread, scipy's included (vqdiff.blas)
        self.model_dir, self.codec = open_codec(SETTINGS.model_path, self.bento_model, device=SETTINGS.device, threads=SETTINGS.threads)
        self.pipeline, self.card = self.codec.pipeline, model_card(self.model_dir, self.codec)
        self.batcher = MicroBatcher({"encode": lambda x: filesteps.encode_and_decode(self.codec, x), "decode": self.codec.decode_groups},
                                    max_groups=SETTINGS.max_batch_groups, max_wait_ms=SETTINGS.max_batch_wait_ms)
        self.card["warmup_s"] = round(warm_up(self.codec), 3)
        self.norms = Norms.load(SETTINGS.norms) if SETTINGS.norms else None  # POST /score; a bad file stops the start
        self.card["norms"] = {"path": SETTINGS.norms, "tracts": sorted(self.norms.tracts)} if self.norms else None
        log.info("worker ready in %.1f s: model %s (%s), engine %s (%s), %d thread(s)", time.perf_counter() - t0,
                 self.card["model"].get("id"), self.model_dir, self.card["engine_variant"], self.card["provider"], SETTINGS.threads)

    @bentoml.on_startup
    async def _start_heap_trim(self) -> None:
        self._trim_task = asyncio.create_task(trim_heap(SETTINGS.heap_trim_s, lambda: self.batcher.calls))

    @bentoml.on_shutdown
    def _close(self) -> None:
        self._trim_task.cancel()
        self.batcher.close()

    async def _cpu(self, fn, *args):
        """Parsing, canonicalisation and writing: worker threads, at most VQDIFF_IO_THREADS at once."""
        self._limiter = getattr(self, "_limiter", None) or anyio.CapacityLimiter(SETTINGS.io_threads)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _run(self, ctx, work, *uploads_: Path | None) -> Response:
        """``await work(timer)``; refusals as 4xx JSON; the uploaded files always removed."""
        try:
            return await work(uploads.Timer())
        except (ApiError, VQDiffError) as exc:
            err = exc if isinstance(exc, ApiError) else refusal(exc)
            if err is None:
                raise
            log.info("%s refused (%d %s): %s", ctx.request.url.path, err.status, err.reason, err.message[:300])
            ctx.response.status_code = err.status  # BentoML answers with the context's status
            return err.to_response()
        finally:
            for p in filter(None, uploads_):
                Path(p).unlink(missing_ok=True)

    async def _encode_upload(self, files: list[Path], reference: Path | None, register: str, segment: str, timer,
                             names: dict):
        """Uploads -> (file, state, its `Latents` or `Subject`, its decoded groups): read and prepared in a worker
        thread (`vqdiff.filesteps.prepare_file`: a TRX with groups, a segmented file or several files is a subject),
        every bundle's groups through the batched engine together, decoded for the fidelity the latents record."""
        if segment not in SEGMENT_MODES:
            raise ApiError(400, "bad_segment", f"segment={segment!r}", f"segment = {' | '.join(SEGMENT_MODES)}")

        def read():
            bundle, sha = uploads.read_files(files, reference, names.get("file", []), max_bundles=SETTINGS.max_bundles,
                                             reference_name=names.get("reference", ""),
                                             max_streamlines=SETTINGS.max_streamlines, max_points=SETTINGS.max_points)
            if len(bundle.groups) > SETTINGS.max_bundles:
                raise ApiError(413, "too_many_bundles", f"the file has {len(bundle.groups)} groups; this server takes "
                               f"at most {SETTINGS.max_bundles} bundles per request", limit_bundles=SETTINGS.max_bundles)
            try:
                return bundle, *filesteps.prepare_file(self.pipeline, bundle, input_sha256=sha, register=register,
                                                       segment=segment)
            except ValueError as exc:
                if isinstance(exc, VQDiffError):  # BundleFormatError: `_run` answers it
                    raise
                raise ApiError(400, "bad_register", str(exc), REGISTER_MODES) from exc

        bundle, x, state = await self._cpu(read)
        timer.mark("read")
        latents, indices, decoded = await self.batcher.run("encode", x)  # decoded: the fidelity the latents record
        timer.mark("model")
        return bundle, state, await self._cpu(filesteps.assemble_file_latents, self.pipeline, state, latents, indices,
                                              decoded), decoded

    def _summary(self, lat, **extra) -> dict:
        return {**filesteps.describe(lat), "model": self.pipeline.model_info, **extra}

    @bentoml.api(route="/encode")
    async def encode(self, file: list[Path], reference: OptionalFile = None, register: str = "auto",
                     segment: str = "auto", summary: bool = False, embedding: bool = False,
                     ctx: bentoml.Context = None) -> Path:
        """Tractogram (TRK; TCK + ``reference``; TRX), or a subject's per-bundle files -> latents file (.vqlat; a
        subject file for several bundles); ``register``: auto | off | <bundle>; ``segment``: auto | on | off;
        ``embedding`` (with ``summary``): each bundle's embedding (`vqdiff.analysis.embedding`) in the summary."""

        async def work(timer):
            if embedding and not summary:
                raise ApiError(400, "embedding_needs_summary", "embedding=true without summary=true", "embedding=true "
                               "with summary=true (the embedding is in the JSON summary)")
            bundle, state, lat, _ = await self._encode_upload(file, reference, register, segment, timer, _names(ctx))
            data = await self._cpu(lat.to_bytes)
            info = self._summary(lat, source_format=bundle.source_format, latents_bytes=len(data),
                                 registration=getattr(state, "registration", None), warnings=filesteps.file_warnings(state))
            if embedding:
                info["embedding"] = {"version": analysis.EMBEDDING_VERSION, "bundles": {
                    n: analysis.embedding(part).tolist() for n, part in filesteps.named_parts(lat)}}
            return _respond(info, timer, summary, data, f"{bundle.name or 'bundle'}.vqlat")

        return await self._run(ctx, work, *file, reference)

    @bentoml.api(route="/decode")
    async def decode(self, file: Path, format: str | None = None, restore_points: bool = False, bundles: str = "file",
                     summary: bool = False, ctx: bentoml.Context = None) -> Path:
        """Latents file -> tractogram (TRK, or TCK / TRX) in the caller's original space and order; a subject file
        -> the whole file (TRX with its groups by default), or with ``bundles=zip`` a zip of one file per bundle."""

        async def work(timer):
            if bundles not in ("file", "zip"):
                raise ApiError(400, "bad_bundles", f"bundles={bundles!r}", "bundles = file (one file) | zip (one per bundle)")
            lat, x = await self._cpu(lambda: uploads.read_latents(
                file, self.pipeline, self.card["latent_shape"], max_groups=SETTINGS.max_groups,
                max_points=SETTINGS.max_points, max_bundles=SETTINGS.max_bundles))
            fmt = uploads.output_format(format, "trx" if isinstance(lat, Subject) else "trk")
            timer.mark("read")
            groups = await self.batcher.run("decode", x)
            timer.mark("model")

            def finish():
                out = filesteps.assemble_decoded(self.pipeline, lat, groups, restore_points=restore_points,
                                                 per_bundle=bundles == "zip")
                return (lat.source.get("name"), uploads.write_zip(out, fmt)) if bundles == "zip" else (
                    out.name, uploads.write_bundle(out, fmt))

            name, data = await self._cpu(finish)
            info = self._summary(lat, format=fmt, bytes=len(data), warnings=[])
            return _respond(info, timer, summary, data, f"{name or 'bundle'}.{'zip' if bundles == 'zip' else fmt}")

        return await self._run(ctx, work, file)

    @bentoml.api(route="/reconstruct")
    async def reconstruct(self, file: list[Path], reference: OptionalFile = None, register: str = "auto",
                          segment: str = "auto", format: str | None = None, summary: bool = False,
                          ctx: bentoml.Context = None) -> Path:
        """Tractogram(s) -> the reconstruction through the model, with BUAN and MDF figures (per bundle too)."""

        async def work(timer):
            fmt = uploads.output_format(format, "trk") if format else None
            bundle, state, lat, groups = await self._encode_upload(file, reference, register, segment, timer,
                                                                   _names(ctx))
            fmt = fmt or ("trx" if isinstance(lat, Subject) else uploads.output_format(None, bundle.source_format))

            def finish():
                recon, figures = filesteps.reconstruct(self.pipeline, bundle, lat, groups)
                timer.mark("quality")
                return figures, uploads.write_bundle(recon, fmt)

            figures, data = await self._cpu(finish)
            info = self._summary(lat, format=fmt, quality=figures, registration=getattr(state, "registration", None),
                                 warnings=filesteps.file_warnings(state))
            return _respond(info, timer, summary, data, f"{bundle.name or 'bundle'}_recon.{fmt}", {
                "X-VQDiff-BUAN": str(figures["buan_t5"]), "X-VQDiff-Mean-MDF-mm": str(figures["mean_mdf_mm"])})

        return await self._run(ctx, work, *file, reference)

    @bentoml.api(route="/score")
    async def score(self, file: Path, ctx: bentoml.Context = None) -> Path:
        """Latents or subject file -> each bundle's deviation score against the norms (``VQDIFF_NORMS``)."""

        async def work(timer):
            if self.norms is None:
                raise ApiError(503, "no_norms", "this server has no norms to score against", "a server started with "
                               "VQDIFF_NORMS set to a norms file from `vqdiff-norms fit`")

            def run():
                lat, _ = uploads.read_latents(file, self.pipeline, self.card["latent_shape"], max_groups=SETTINGS.max_groups,
                                              max_points=SETTINGS.max_points, max_bundles=SETTINGS.max_bundles)
                try:
                    return [score_latents(part, self.norms, bundle=n).to_dict() for n, part in filesteps.named_parts(lat)]
                except analysis.AnalysisError as exc:
                    raise ApiError(422, "cannot_score", str(exc), "latents of tracts the norms have, made by their model "
                                   "(GET /model: norms)") from exc

            return JSONResponse({"bundles": await self._cpu(run), "embedding_version": analysis.EMBEDDING_VERSION,
                                 "seconds": timer.seconds})

        return await self._run(ctx, work, file)


async def _model_card(request: Request) -> Response:
    return JSONResponse({**bentoml.get_current_service().card, "service": SETTINGS.public(),
                         "formats": {"input": ["trk", "tck", "trx"], "output": list(uploads.OUTPUT_FORMATS)}})


VQDiff.mount_asgi_app(Starlette(routes=[Route("/model", _model_card, methods=["GET"])]), path="/")
# Outermost first: while draining, new API requests are refused before their body is read.
VQDiff.add_asgi_middleware(Drain, drain_s=SETTINGS.drain_s, refuse=frozenset(ROUTES))
VQDiff.add_asgi_middleware(RequestGuard, max_upload_bytes=SETTINGS.max_upload_bytes, api_token=SETTINGS.api_token,
                           max_in_flight=SETTINGS.max_in_flight, max_bundles=SETTINGS.max_bundles)
