"""A read file's steps around the engine, for callers that run the engine themselves (the service's
micro-batcher): one bundle -> `vqdiff.latents.Latents`, a file of several bundles (a TRX's groups, a
segmented file, a subject's per-bundle files joined) -> `vqdiff.subject.Subject`, as `Codec.encode_file`
and batch encoding decide (`vqdiff.segment.file_parts`); and the way back to one file or its bundles."""

from __future__ import annotations

from typing import Any

import numpy as np

from .bundle import Bundle


def prepare_file(pipeline, bundle: Bundle, *, input_sha256: str | None = None, register: str = "auto",
                 segment: str = "auto") -> tuple[np.ndarray, Any]:
    """(engine input, state): an `EncodeState` for one bundle, a `SubjectState` for several."""
    from .segment import file_parts
    from .subject import prepare_subject
    from .templates import shared_centroids

    with shared_centroids():  # the file is clustered once for detection and both registrations
        parts, seg = file_parts(bundle, pipeline.templates, mode=segment)  # (None, None): one bundle
        if parts is None:
            return pipeline.prepare_encode(bundle, input_sha256=input_sha256, register=register)
        x, state = prepare_subject(pipeline, bundle, parts=parts, input_sha256=input_sha256, register=register)
    state.source.update({} if seg is None else {"segmentation": seg.to_dict()})  # as `Segmentation.record`
    return x, state


def encode_and_decode(codec, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The engine's part of an encoding as one job: (latents, indices, the decoder's output for those latents:
    the fidelity `assemble_file_latents` records), back to back (the service's micro-batcher runs it per batch)."""
    latents, indices = codec.encode_groups(x)
    return latents, indices, codec.decode_groups(latents)


def assemble_file_latents(pipeline, state, latents: np.ndarray, indices: np.ndarray | None,
                          decoded: np.ndarray | None = None):
    """`Latents` or `Subject` of `prepare_file`'s state and the engine's output (``decoded``: fidelity)."""
    from .subject import SubjectState, assemble_subject

    if isinstance(state, SubjectState):
        return assemble_subject(pipeline, state, latents, indices, decoded)
    return pipeline.assemble_latents(state, latents, indices, decoded)


def file_warnings(state) -> list[dict[str, Any]]:
    """The warnings of an encoding, each naming its bundle (``bundle``) for a subject."""
    if hasattr(state, "parts"):
        return [{**w, "bundle": name} for name, w in state.warnings]
    return list(state.warnings)


def decode_file_input(pipeline, lat, *, strict: bool = True) -> np.ndarray:
    """The decoder input of a `Latents` or a `Subject` (after the model-identity check)."""
    from .subject import Subject, decode_input

    return decode_input(pipeline, lat, strict=strict) if isinstance(lat, Subject) else pipeline.prepare_decode(
        lat, strict=strict)


def assemble_decoded(pipeline, lat, groups: np.ndarray, *, restore_points: bool = False,
                     per_bundle: bool = False) -> Bundle | dict[str, Bundle]:
    """The decoder's output -> the file as one `Bundle` (a subject: every streamline at its place, its
    groups and data), or with ``per_bundle`` its bundles by name (one bundle: ``{name: bundle}``)."""
    from .subject import Subject, assemble_bundles, assemble_file

    if not isinstance(lat, Subject):
        bundle = pipeline.assemble_bundle(lat, groups, restore_points=restore_points)
        return {bundle.name or "bundle": bundle} if per_bundle else bundle
    bundles = assemble_bundles(pipeline, lat, groups, restore_points=restore_points)
    return bundles if per_bundle else assemble_file(lat, bundles, restore_points=restore_points)


def describe(lat) -> dict[str, Any]:
    """What a summary says of encoded latents: streamlines and groups; each bundle's of a subject (its
    groups, recognised template and measured fidelity)."""
    from .subject import Subject

    if not isinstance(lat, Subject):
        return {"streamlines": lat.n_streamlines, "groups": lat.n_groups, "latent_shape": list(lat.latents.shape)}
    bundles = {p.name: {"streamlines": len(p.members), "groups": p.latents.n_groups,
                        "template": (p.latents.registration or {}).get("template"),
                        "fidelity": {k: (p.latents.fidelity or {}).get(k) for k in ("mean_mdf_mm", "p95_mdf_mm", "poor")}}
               for p in lat.parts}
    return {"streamlines": lat.n_streamlines, "groups": sum(b["groups"] for b in bundles.values()), "bundles": bundles}


def reconstruct(pipeline, bundle: Bundle, lat, groups: np.ndarray) -> tuple[Bundle, dict[str, Any]]:
    """(the reconstruction of the read file ``bundle``, its figures `reconstruction_quality`; a subject's
    with each bundle's figures under ``bundles``)."""
    from .quality import reconstruction_quality
    from .subject import Subject, assemble_file, part_bundle

    per = assemble_decoded(pipeline, lat, groups, restore_points=True, per_bundle=True)
    if not isinstance(lat, Subject):
        recon = next(iter(per.values()))
        return recon, reconstruction_quality(bundle, recon)
    recon = assemble_file(lat, per, restore_points=True)
    figures = reconstruction_quality(bundle, recon)
    figures["bundles"] = {p.name: reconstruction_quality(part_bundle(bundle, p.name, p.members), per[p.name])
                          for p in lat.parts}
    return recon, figures


def named_parts(lat) -> list[tuple[str, Any]]:
    """``[(bundle name, its Latents)]`` of a `Latents` (one, named by its source) or a `Subject`."""
    from .subject import Subject

    if isinstance(lat, Subject):
        return [(p.name, p.latents) for p in lat.parts]
    return [(str(lat.source.get("name") or (lat.registration or {}).get("template") or "bundle"), lat)]


def join_files(read: list[tuple[Bundle, str]], *, name: str) -> tuple[Bundle, str]:
    """A subject's per-bundle files, read as ``[(bundle, file sha256)]``, as one file whose groups are the
    bundles (`vqdiff.carried.join_bundles`) and its input hash: as batch's ``--per-subject`` (`subject_sha`,
    over each bundle's name and file hash in order). ValueError for duplicated or missing names."""
    import hashlib

    from .carried import join_bundles

    digest = hashlib.sha256()
    for bundle, sha in read:
        digest.update(f"{bundle.name}\0{sha}\n".encode())
    return join_bundles([b for b, _ in read], name=name), digest.hexdigest()
