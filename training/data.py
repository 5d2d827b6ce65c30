"""Dataset preparation and sampling.

``prepare_dataset`` turns a folder of bundle files into one shard per (subject, bundle) plus a
``manifest.json``. A shard (safetensors) holds the bundle's streamlines resampled to 64 points,
oriented and sorted exactly as `vqdiff.canonical.canonicalise` does, with per-streamline
``group`` (canonical group index) and ``split`` (0 = train, 1 = validation).

Split: by subject when there are several subjects (no subject in both), otherwise by canonical
group (a fixed-seed random 10% of each bundle's groups; at least one group per bundle with >= 2
groups). ``GroupSampler`` draws training groups: a random window of consecutive training
streamlines of one bundle (in canonical order), a random subset of 64 of it, re-sorted as
`canonicalise` sorts a group -- so training groups look like inference groups but never repeat.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqdiff.canonical import GROUP_SIZE, NUM_POINTS, canonical_order, reflect_pad, sort_group
from vqdiff.checkpoint import file_sha256
from vqdiff.discovery import BundleFile, find_bundle_files  # noqa: F401 (re-exported)
from vqdiff.errors import BundleFormatError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "vqdiff-dataset"
FORMAT_VERSION = 1


def split_groups(n_groups: int, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """(n_groups,) bool: True for validation groups."""
    val = np.zeros(n_groups, bool)
    if n_groups >= 2 and fraction > 0:
        k = max(1, int(round(fraction * n_groups)))
        val[rng.choice(n_groups, size=k, replace=False)] = True
    return val


def prepare_dataset(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    balance: bool = False,
    bundles: list[str] | None = None,
    reference: str | None = None,
) -> dict:
    """Write shards and a manifest for every bundle file under ``in_dir``; return the manifest."""
    from safetensors.numpy import save_file

    from vqdiff.io import load_bundle

    files = find_bundle_files(in_dir)
    if bundles:
        files = [f for f in files if f.bundle in set(bundles)]
    if not files:
        raise FileNotFoundError(f"no bundle files (.trk, .tck, .trx) found under {in_dir}")
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    subjects = sorted({f.subject for f in files})
    rng = np.random.default_rng(seed)
    by_subject = len(subjects) > 1
    val_subjects = set()
    if by_subject:
        mask = split_groups(len(subjects), rng, val_fraction)
        val_subjects = {s for s, v in zip(subjects, mask, strict=True) if v}
    bundle_names = sorted({f.bundle for f in files})
    entries, failed = [], []
    for f in files:
        try:
            b = load_bundle(f.path, reference=reference)
        except BundleFormatError as e:
            log.warning("skipping %s: %s", f.path, e)
            failed.append({"path": str(f.path), "error": str(e)})
            continue
        oriented, _, perm, _ = canonical_order(b.streamlines)
        x = oriented[perm]  # (N, 64, 3) float32 in canonical order
        group = np.arange(len(x)) // GROUP_SIZE
        n_groups = int(group[-1]) + 1
        if by_subject:
            val_group = np.full(n_groups, f.subject in val_subjects)
        else:
            val_group = split_groups(n_groups, rng, val_fraction)
        split = val_group[group].astype(np.uint8)
        name = f"{f.subject}__{f.bundle}.safetensors"
        save_file(
            {"streamlines": x, "group": group.astype(np.int64), "split": split},
            str(out / "shards" / name),
            metadata={"subject": f.subject, "bundle": f.bundle},
        )
        entries.append(
            {
                "shard": f"shards/{name}",
                "subject": f.subject,
                "bundle": f.bundle,
                "label": bundle_names.index(f.bundle),
                "source": str(f.path),
                "source_sha256": file_sha256(f.path),
                "streamlines": len(x),
                "groups": n_groups,
                "val_groups": int(val_group.sum()),
                "train_streamlines": int((split == 0).sum()),
            }
        )
        log.info("%s/%s: %d streamlines, %d groups (%d validation)", f.subject, f.bundle, len(x), n_groups,
                 int(val_group.sum()))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "val_fraction": val_fraction,
        "split_by": "subject" if by_subject else "group",
        "balance": balance,
        "bundles": bundle_names,
        "subjects": subjects,
        "val_subjects": sorted(val_subjects),
        "shards": entries,
        "failed": failed,
    }
    manifest["sha256"] = hashlib.sha256(
        json.dumps([(e["source_sha256"], e["subject"], e["bundle"]) for e in entries] + [seed, val_fraction])
        .encode()
    ).hexdigest()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass
class BundleData:
    bundle: str
    subject: str
    label: int
    train: np.ndarray  # (Nt, 64, 3) training streamlines in canonical order (RAS mm)
    val_groups: np.ndarray  # (Gv, 64, 64, 3) held-out canonical groups (reflect-padded)


def load_dataset(data_dir: str | Path) -> tuple[dict, list[BundleData]]:
    from safetensors.numpy import load_file

    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; create the dataset with `vqdiff-prepare IN_DIR {data_dir}`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest")
    out = []
    for e in manifest["shards"]:
        t = load_file(str(data_dir / e["shard"]))
        x, group, split = t["streamlines"], t["group"], t["split"].astype(bool)
        val = []
        for g in np.unique(group[split]):
            members = x[group == g]
            if len(members) < GROUP_SIZE:  # reflect-pad like canonicalise
                members = np.concatenate([members, members[reflect_pad(len(members), GROUP_SIZE)]])
            val.append(members)
        val_groups = np.stack(val) if val else np.zeros((0, GROUP_SIZE, NUM_POINTS, 3), np.float32)
        out.append(BundleData(e["bundle"], e["subject"], e["label"], x[~split], val_groups))
    return manifest, out


class GroupSampler:
    """Draws training groups (B, 64, 64, 3) in RAS mm from the training streamlines.

    Each group: pick a bundle (uniformly with ``balance`` else in proportion to its training
    streamlines), a window of ``64 + extra`` consecutive streamlines (extra uniform in
    [0, ``max_extra``]), a random subset of 64 kept in canonical order, then re-sorted along the
    group's own first principal component as `canonicalise` does. Optional small rigid jitter.
    """

    def __init__(self, bundles: list[BundleData], *, balance: bool = False, max_extra: int = 32,
                 rotate_deg: float = 0.0, translate_mm: float = 0.0, seed: int = 0):
        self.bundles = [b for b in bundles if len(b.train) > 0]
        if not self.bundles:
            raise ValueError("no training streamlines in the dataset")
        sizes = np.array([len(b.train) for b in self.bundles], float)
        self.p = np.full(len(sizes), 1 / len(sizes)) if balance else sizes / sizes.sum()
        self.max_extra = max_extra
        self.rotate = np.deg2rad(rotate_deg)
        self.translate = translate_mm
        self.rng = np.random.default_rng(seed)

    def _one(self, b: BundleData) -> np.ndarray:
        rng = self.rng
        n = len(b.train)
        width = min(n, GROUP_SIZE + int(rng.integers(0, self.max_extra + 1)))
        start = int(rng.integers(0, n - width + 1))
        idx = np.sort(rng.choice(width, size=min(width, GROUP_SIZE), replace=False)) + start
        if len(idx) < GROUP_SIZE:
            idx = np.concatenate([idx, idx[reflect_pad(len(idx), GROUP_SIZE)]])
        return sort_group(b.train[idx])

    def _jitter(self, g: np.ndarray) -> np.ndarray:
        if self.rotate <= 0 and self.translate <= 0:
            return g
        angles = self.rng.uniform(-self.rotate, self.rotate, size=3)
        cx, cy, cz = np.cos(angles)
        sx, sy, sz = np.sin(angles)
        r = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
             @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
        c = g.reshape(-1, 3).mean(axis=0)
        t = self.rng.uniform(-self.translate, self.translate, size=3)
        return ((g - c) @ r.T + c + t).astype(np.float32)

    def sample(self, batch_size: int) -> np.ndarray:
        which = self.rng.choice(len(self.bundles), size=batch_size, p=self.p)
        return np.stack([self._jitter(self._one(self.bundles[i])) for i in which])

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
