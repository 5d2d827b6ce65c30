"""Dataset preparation and sampling.

``prepare_dataset`` turns a folder of bundle files into one shard per (subject, bundle) plus a
``manifest.json``. A shard (safetensors) holds the bundle's streamlines resampled to 64 points,
oriented and sorted exactly as `vqdiff.canonical.canonicalise` does, with per-streamline
``group`` (canonical group index) and ``split`` (`TRAIN` 0 = train, `VAL` 1 = validation, `TEST` 2 =
test).

Split: by subject when there are several subjects (no subject in two splits), otherwise by
canonical group (a fixed-seed random ``val_fraction`` and ``test_fraction`` of each bundle's
groups). Every split that is asked for gets at least one unit, validation first, as long as one
training unit is left: a bundle of 2 groups gets 1 validation and no test group, of 3 or more one
of each. Validation selects the model (``best/``, early stopping); test is never read by training
(`BundleData.test_groups`; ``vqdiff-evaluate --split test``). Manifests of format version 1 (no
test split) are still read: their test split is empty. With ``test_fraction=0`` the split, the
shards and the manifest hash are those version 1 wrote.

``GroupSampler`` draws training groups: a random window of consecutive training streamlines of one
bundle (in canonical order), a random subset of 64 of it, sorted as `canonicalise` sorts a group
-- so training groups look like inference groups but never repeat -- then, optionally, augmented
(`vqdiff.training.augment`) and put in canonical order again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vqdiff.canonical import GROUP_SIZE, NUM_POINTS, canonical_order, reflect_pad, sort_group
from vqdiff.checkpoint import file_sha256
from vqdiff.discovery import BundleFile, find_bundle_files  # noqa: F401 (re-exported)
from vqdiff.errors import BundleFormatError

from .augment import Augmentation, mid_sagittal_x, mirror_name, orientation_axis

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "vqdiff-dataset"
FORMAT_VERSION = 2  # 2: + test split (code 2); version 1 manifests (train / validation only) are still read
READABLE_VERSIONS = (1, 2)
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VAL: "validation", TEST: "test"}


def split_codes(n: int, rng: np.random.Generator, val_fraction: float, test_fraction: float = 0.0) -> np.ndarray:
    """(n,) uint8 split codes (`TRAIN`, `VAL`, `TEST`) of ``n`` units (canonical groups or subjects).

    ``max(1, round(fraction * n))`` units per requested split, validation first, while at least one
    training unit is left. One ``rng.choice`` per call (none when nothing is held out): with
    ``test_fraction=0`` exactly the draws, hence the split, of format version 1.
    """
    codes = np.zeros(n, np.uint8)
    k_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 and n >= 2 else 0
    k_val = min(k_val, n - 1) if n >= 2 else 0
    k_test = max(1, int(round(test_fraction * n))) if test_fraction > 0 else 0
    k_test = max(0, min(k_test, n - 1 - k_val))
    if k_val + k_test:
        chosen = rng.choice(n, size=k_val + k_test, replace=False)
        codes[chosen[:k_val]] = VAL
        codes[chosen[k_val:]] = TEST
    return codes


def split_groups(n_groups: int, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """(n_groups,) bool: True for validation groups (no test split; format version 1's rule)."""
    return split_codes(n_groups, rng, fraction) == VAL


def prepare_dataset(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    balance: bool = False,
    bundles: list[str] | None = None,
    reference: str | None = None,
) -> dict:
    """Write shards and a manifest for every bundle file under ``in_dir``; return the manifest.

    ``val_fraction`` / ``test_fraction``: the share of canonical groups (one subject) or subjects
    (several) held out for validation (model selection) and for test (never seen in training).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) "
                         "with a sum below 1")
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
    subject_split: dict[str, int] = {}
    if by_subject:
        codes = split_codes(len(subjects), rng, val_fraction, test_fraction)
        subject_split = {s: int(c) for s, c in zip(subjects, codes, strict=True)}
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
            group_split = np.full(n_groups, subject_split[f.subject], np.uint8)
        else:
            group_split = split_codes(n_groups, rng, val_fraction, test_fraction)
        split = group_split[group]
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
                "val_groups": int((group_split == VAL).sum()),
                "test_groups": int((group_split == TEST).sum()),
                "train_streamlines": int((split == TRAIN).sum()),
            }
        )
        log.info("%s/%s: %d streamlines, %d groups (%d validation, %d test)", f.subject, f.bundle, len(x),
                 n_groups, entries[-1]["val_groups"], entries[-1]["test_groups"])
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "split_by": "subject" if by_subject else "group",
        "split_codes": {str(k): v for k, v in SPLIT_NAMES.items()},
        "balance": balance,
        "bundles": bundle_names,
        "subjects": subjects,
        "val_subjects": sorted(s for s, c in subject_split.items() if c == VAL),
        "test_subjects": sorted(s for s, c in subject_split.items() if c == TEST),
        "shards": entries,
        "failed": failed,
    }
    # the version 1 hash when there is no test split (the same split as version 1 wrote)
    split_key = [seed, val_fraction] + ([test_fraction] if test_fraction else [])
    manifest["sha256"] = hashlib.sha256(
        json.dumps([(e["source_sha256"], e["subject"], e["bundle"]) for e in entries] + split_key).encode()
    ).hexdigest()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _no_groups() -> np.ndarray:
    return np.zeros((0, GROUP_SIZE, NUM_POINTS, 3), np.float32)


@dataclass
class BundleData:
    bundle: str
    subject: str
    label: int
    train: np.ndarray  # (Nt, 64, 3) training streamlines in canonical order (RAS mm)
    val_groups: np.ndarray  # (Gv, 64, 64, 3) validation canonical groups (reflect-padded): model selection
    test_groups: np.ndarray = field(default_factory=_no_groups)  # (Gt, 64, 64, 3) test groups: never trained on

    def held_out(self, split: str) -> np.ndarray:
        """The held-out groups of ``split`` ("val" / "validation" or "test")."""
        if split in ("val", "validation"):
            return self.val_groups
        if split == "test":
            return self.test_groups
        raise ValueError(f"unknown split {split!r}; select 'val' or 'test'")


def _split_groups(x: np.ndarray, group: np.ndarray, member: np.ndarray) -> np.ndarray:
    """The whole canonical groups (G, 64, 64, 3) of the streamlines ``member`` (bool), reflect-padded."""
    out = []
    for g in np.unique(group[member]):
        members = x[group == g]
        if len(members) < GROUP_SIZE:  # reflect-pad like canonicalise
            members = np.concatenate([members, members[reflect_pad(len(members), GROUP_SIZE)]])
        out.append(members)
    return np.stack(out) if out else _no_groups()


def load_dataset(data_dir: str | Path) -> tuple[dict, list[BundleData]]:
    """The manifest and every shard: training streamlines, validation and test groups per bundle."""
    from safetensors.numpy import load_file

    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; create the dataset with `vqdiff-prepare IN_DIR {data_dir}`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path} is not a {FORMAT} manifest of version {' or '.join(map(str, READABLE_VERSIONS))}")
    manifest.setdefault("test_fraction", 0.0)  # version 1: no test split
    manifest.setdefault("test_subjects", [])
    out = []
    for e in manifest["shards"]:
        t = load_file(str(data_dir / e["shard"]))
        x, group, split = t["streamlines"], t["group"], t["split"]
        out.append(BundleData(e["bundle"], e["subject"], e["label"], x[split == TRAIN],
                              _split_groups(x, group, split == VAL), _split_groups(x, group, split == TEST)))
    return manifest, out


class GroupSampler:
    """Draws training groups (B, 64, 64, 3) in RAS mm from the training streamlines.

    Each group: pick a bundle (uniformly with ``balance`` else in proportion to its training
    streamlines), a window of ``64 + extra`` consecutive streamlines (extra uniform in
    [0, ``max_extra``]), a random subset of 64 kept in canonical order, then re-sorted along the
    group's own first principal component as `canonicalise` does. ``augment`` (an
    `vqdiff.training.augment.Augmentation`) then transforms it -- mirror about the plane
    x = ``mirror_x`` (default: each subject's mid-sagittal plane from its training streamlines,
    `mid_sagittal_x`; ``mirror_planes`` has them), affine, elastic, jitter -- and puts it back in
    canonical order. Every random draw comes from one
    generator, so `state` / `set_state` resume the stream exactly, augmentations included.
    ``rotate_deg`` / ``translate_mm`` are kept for callers of the former rigid jitter.
    """

    def __init__(self, bundles: list[BundleData], *, balance: bool = False, max_extra: int = 32,
                 rotate_deg: float = 0.0, translate_mm: float = 0.0, seed: int = 0,
                 augment: Augmentation | None = None, mirror_x: float | None = None):
        self.bundles = [b for b in bundles if len(b.train) > 0]
        if not self.bundles:
            raise ValueError("no training streamlines in the dataset")
        sizes = np.array([len(b.train) for b in self.bundles], float)
        self.p = np.full(len(sizes), 1 / len(sizes)) if balance else sizes / sizes.sum()
        self.max_extra = max_extra
        if augment is None and (rotate_deg > 0 or translate_mm > 0):
            augment = Augmentation(rotate_deg=rotate_deg, translate_mm=translate_mm)
        self.augment = augment if augment is not None and augment.active else None
        self.mirror_planes: dict[str, dict] = {}
        if self.augment is not None and self.augment.mirror_prob > 0:
            for subject in sorted({b.subject for b in self.bundles}):
                if mirror_x is None:
                    x, how = mid_sagittal_x({b.bundle: b.train for b in self.bundles if b.subject == subject})
                else:
                    x, how = float(mirror_x), "given"
                self.mirror_planes[subject] = {"x": round(x, 3), "from": how}
        self.mirror_xs = [self.mirror_planes.get(b.subject, {"x": 0.0})["x"] for b in self.bundles]
        # each bundle's canonical orientation axis: a transformed group is re-oriented as its bundle would be
        self.axes = [orientation_axis(b.train) for b in self.bundles] if self.augment else []
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

    def sample_with_names(self, batch_size: int) -> tuple[np.ndarray, list[str]]:
        """A batch and each group's bundle name (``_L`` / ``_R`` swapped for mirrored groups)."""
        which = self.rng.choice(len(self.bundles), size=batch_size, p=self.p)
        groups, names = [], []
        for i in which:
            g, name = self._one(self.bundles[i]), self.bundles[i].bundle
            if self.augment is not None:
                g, d = self.augment.apply(g, self.rng, mirror_x=self.mirror_xs[i], axis=self.axes[i])
                name = mirror_name(name) if d.mirrored else name
            groups.append(g)
            names.append(name)
        return np.stack(groups), names

    def sample(self, batch_size: int) -> np.ndarray:
        return self.sample_with_names(batch_size)[0]

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
