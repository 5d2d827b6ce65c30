"""Batch encoding per subject (``vqdiff-encode-batch --per-subject``): a subject's bundle files joined
(`vqdiff.carried.join_bundles`: one group per file, named by its bundle) and encoded part by part into
one subject latents file (`vqdiff.subject`), through the same stages and engine batches as single files;
and what the index records of a written latents file (registration and fidelity, per bundle)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vqdiff.codec import same_provenance
from vqdiff.subject import FORMAT, FORMAT_VERSION


def subject_sha(members) -> str:
    """The input hash of a subject: sha256 over its files' (bundle name, sha256), in path order."""
    from vqdiff.fileio import file_sha256

    digest = hashlib.sha256()
    for path, bundle in members:
        digest.update(f"{bundle}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def prepare_subject_task(spec, task, sha: str):
    """(engine input of every bundle of the subject, `vqdiff.subject.SubjectState`)."""
    from vqdiff.carried import join_bundles
    from vqdiff.io import load_bundle
    from vqdiff.subject import prepare_subject

    bundles = [load_bundle(path, reference=spec.reference, name=bundle) for path, bundle in task.members]
    joined = join_bundles(bundles, name=task.subject, where=task.rel)
    return prepare_subject(spec.pipeline, joined, input_sha256=sha)


def subject_up_to_date(spec, sha: str, header: dict) -> tuple[dict[str, Any] | None, str]:
    """(index fields, "") when the subject file with safetensors ``header`` is this input's output under this
    model and engine, else (None, why not)."""
    meta = header["__metadata__"]
    if (meta.get("format"), meta.get("format_version")) != (FORMAT, str(FORMAT_VERSION)):
        return None, f"it is not a {FORMAT} v{FORMAT_VERSION} file"
    head, parts = json.loads(meta["subject"]), json.loads(meta["parts"])
    theirs = (head.get("source", {}).get("input_sha256"), head.get("model", {}).get("sha256"))
    if theirs != (sha, spec.model_info.get("sha256")):
        return None, f"it records input {str(theirs[0])[:12]} / model {str(theirs[1])[:12]}"
    for part in parts:
        made = json.loads(part["metadata"].get("provenance", "{}"))
        if not same_provenance(made, spec.pipeline.provenance):
            return None, f"it was made by {made or 'an older vqdiff'}, not {spec.pipeline.provenance}"
        if spec.fidelity and "fidelity" not in part["metadata"]:
            return None, "it records no fidelity"
    bundles = {}
    for i, part in enumerate(parts):
        m = part["metadata"]
        bundles[part["name"]] = {"streamlines": header[f"part.{i}.members"]["shape"][0],
                                 "registration": registration_summary(json.loads(m.get("registration", "{}"))),
                                 "fidelity": fidelity_summary(json.loads(m.get("fidelity", "{}")))}
    groups = sum(header[f"part.{i}.latents"]["shape"][0] for i in range(len(parts)))
    return {"streamlines": int(head["n_streamlines"]), "groups": groups, "bundles": bundles}, ""


def fidelity_summary(fidelity: dict) -> dict | None:
    """What the index records of a bundle's measured fidelity (None when it was not measured)."""
    return {k: fidelity.get(k) for k in ("mean_mdf_mm", "p95_mdf_mm", "max_mdf_mm", "poor")} if fidelity else None


def latents_summary(lat) -> dict:
    """A written file's index fields: registration and fidelity (per bundle for a subject, as a rerun reads them)."""
    if hasattr(lat, "parts"):
        return {"bundles": {p.name: {"streamlines": len(p.members), **latents_summary(p.latents)} for p in lat.parts}}
    return {"registration": registration_summary(lat.registration), "fidelity": fidelity_summary(lat.fidelity)}


def registration_summary(registration: dict) -> dict:
    """What the index records of a file's registration: the recognised bundle, method, residual, known."""
    return {k: registration.get(k) for k in ("template", "method", "residual_mm", "known")}


def flagged(records) -> dict[str, list[str]]:
    """The bundles a job's index flags, by warning: ``unknown_bundle`` (recognition) and
    ``poor_reconstruction`` (measured fidelity above the model's limits), as ``input`` or ``input:bundle``."""
    out: dict[str, list[str]] = {"unknown_bundle": [], "poor_reconstruction": []}
    for rec in records:
        items = [(f"{rec['input']}:{k}", v) for k, v in rec["bundles"].items()] if rec.get("bundles") else [
            (rec["input"], rec)]
        for name, item in items:
            if (item.get("registration") or {}).get("known") is False:
                out["unknown_bundle"].append(name)
            if (item.get("fidelity") or {}).get("poor"):
                out["poor_reconstruction"].append(name)
    return out
