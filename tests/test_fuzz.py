"""Seeded fuzzing of every reader: byte flips, truncations, splices and header-field mutations of real
TRK / TCK / TRX files and latents files. Every case must read or raise the project's own error
(`BundleFormatError` / `LatentsFormatError`), never anything else, and never hang.

Bounded for CI (``VQDIFF_FUZZ_CASES`` per format, default 150); longer runs:
``VQDIFF_FUZZ_CASES=5000 pytest tests/test_fuzz.py``. The seed is printed on failure
(``VQDIFF_FUZZ_SEED`` replays a run).
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

from vqdiff.bundle import Bundle
from vqdiff.errors import BundleFormatError, LatentsFormatError
from vqdiff.io import bundle_to_bytes, load_bundle_bytes
from vqdiff.latents import Latents

CASES = int(os.environ.get("VQDIFF_FUZZ_CASES", "150"))
SEED = int(os.environ.get("VQDIFF_FUZZ_SEED", "20261201"))


def _sample(subject_dir: Path, n: int = 70) -> Bundle:
    from vqdiff.io import load_bundle

    b = load_bundle(subject_dir / "PYT_R.trk")
    rng = np.random.default_rng(0)
    lines = [s[: int(k)] for s, k in zip(b.streamlines[:n], rng.integers(2, 64, n), strict=True)]  # varied lengths
    return Bundle(lines, b.header, "trk", "PYT_R")


def mutations(data: bytes, rng: np.random.Generator, header: int):
    """One mutated copy of ``data``: what a damaged disk, a cut upload or a hostile client sends."""
    b = bytearray(data)
    kind = rng.integers(6)
    if kind == 0:  # flip a few bits anywhere
        for i in rng.integers(0, len(b), rng.integers(1, 8)):
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate
        del b[int(rng.integers(0, len(b))):]
    elif kind == 2:  # overwrite a header field with an extreme 4-byte value
        at = int(rng.integers(0, max(1, min(header, len(b) - 4))))
        b[at:at + 4] = struct.pack("<i", int(rng.choice([0, -1, 1, 2**31 - 1, -2**31, 3, 255])))
    elif kind == 3:  # garbage in the header
        at = int(rng.integers(0, max(1, min(header, len(b)))))
        b[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    elif kind == 4:  # splice: duplicate or drop a chunk
        a, c = sorted(rng.integers(0, len(b), 2).tolist())
        b = b[:a] + b[c:] if rng.random() < 0.5 else b[:c] + b[a:c] + b[c:]
    else:  # non-finite or huge floats in the body
        for i in rng.integers(header, max(header + 1, len(b) - 4), 4):
            b[int(i):int(i) + 4] = struct.pack("<f", float(rng.choice([np.nan, np.inf, -np.inf, 3e38, 1e-45])))
    return bytes(b)


def run_cases(read, data: bytes, rng, header: int, ours: type[Exception], what: str) -> dict[str, int]:
    """Feed ``CASES`` mutations of ``data`` to ``read``; fail on any exception that is not ``ours``."""
    outcomes = {"read": 0, "refused": 0}
    for case in range(CASES):
        mutated = mutations(data, rng, header)
        try:
            read(mutated)
            outcomes["read"] += 1
        except ours:
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 (the point of the test)
            pytest.fail(f"{what} case {case} (seed {SEED}): {type(exc).__name__}: {exc}")
    assert outcomes["refused"] > CASES // 10, outcomes  # the mutations do damage
    return outcomes


@pytest.mark.parametrize("fmt, header", [("trk", 1000), ("tck", 200), ("trx", 400)])
def test_bundle_readers_raise_only_our_error(subject_dir, fmt, header):
    bundle = _sample(subject_dir)
    data = bundle_to_bytes(bundle, format=fmt if fmt != "tck" else "tck")
    rng = np.random.default_rng([SEED, ord(fmt[1])])
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        if fmt == "tck":
            ref = Path(tmp) / "ref.trk"
            ref.write_bytes(bundle_to_bytes(bundle, format="trk"))
        run_cases(lambda d: load_bundle_bytes(d, format=fmt, reference=ref, max_streamlines=100_000,
                                              max_points=10_000_000), data, rng, header, BundleFormatError, fmt)


def test_latents_reader_raises_only_our_error(subject_dir):
    from vqdiff.codec import Pipeline
    from vqdiff.normalise import Normalisation

    bundle = _sample(subject_dir)
    pipe = Pipeline(Normalisation.fit(np.concatenate(bundle.streamlines)), {"id": "fuzz", "sha256": "0" * 64})
    x, state = pipe.prepare_encode(bundle, register="off")
    lat = pipe.assemble_latents(state, np.zeros((len(x), 8, 16, 16), np.float32), np.zeros((len(x), 16, 16), np.int64))
    data = lat.to_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng([SEED, 7])

    def read(d):
        back = Latents.from_bytes(d)
        pipe.assemble_bundle(back, np.zeros((back.n_groups, 3, 64, 64), np.float32), restore_points=True)

    run_cases(read, data, rng, header, LatentsFormatError, "latents")


def _with_carried(bundle: Bundle) -> Bundle:
    rng = np.random.default_rng(3)
    m = sum(len(s) for s in bundle.streamlines)
    bundle.dps = {"w": rng.random(len(bundle)).astype(np.float32), "rgb": rng.random((len(bundle), 3)).astype(np.float32)}
    bundle.dpv = {"fa": rng.random(m).astype(np.float32)}
    bundle.groups = {"a": np.arange(0, 40), "b": np.arange(30, 70)}
    return bundle


@pytest.mark.parametrize("fmt, header", [("trk", 1000), ("trx", 600)])
def test_readers_of_carried_data_raise_only_our_error(subject_dir, fmt, header):
    """TRX groups / dps / dpv and TRK scalars / properties (named in the header)."""
    data = bundle_to_bytes(_with_carried(_sample(subject_dir)), format=fmt)
    rng = np.random.default_rng([SEED, ord(fmt[1]), 1])
    run_cases(lambda d: load_bundle_bytes(d, format=fmt, max_streamlines=100_000, max_points=10_000_000), data, rng,
              header, BundleFormatError, f"{fmt} with carried data")


def test_subject_reader_raises_only_our_error(subject_dir):
    from vqdiff.codec import Pipeline
    from vqdiff.normalise import Normalisation
    from vqdiff.subject import (
        assemble_bundles,
        assemble_file,
        assemble_subject,
        load_latents,
        prepare_subject,
    )

    bundle = _with_carried(_sample(subject_dir))
    pipe = Pipeline(Normalisation.fit(np.concatenate(bundle.streamlines)), {"id": "fuzz", "sha256": "0" * 64})
    x, state = prepare_subject(pipe, bundle, register="off")
    subject = assemble_subject(pipe, state, np.zeros((len(x), 8, 16, 16), np.float32), None)
    data = subject.to_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng([SEED, 11])

    def read(d):
        back = load_latents(d)
        if hasattr(back, "parts"):
            g = np.zeros((sum(p.latents.n_groups for p in back.parts), 3, 64, 64), np.float32)
            assemble_file(back, assemble_bundles(pipe, back, g, restore_points=True), restore_points=True)

    run_cases(read, data, rng, header, LatentsFormatError, "subject latents")


def test_the_harness_fails_on_a_foreign_error():
    """A reader that lets a foreign exception out fails the harness (so the tests above can fail)."""
    def leaky(data: bytes):
        if data[:1] == b"T":
            raise BundleFormatError("ours", reason="unreadable")
        raise struct.error("unpack requires a buffer")  # what an unguarded parser raises

    with pytest.raises(pytest.fail.Exception, match="struct.error|error: unpack"):
        run_cases(leaky, b"TRACK" + bytes(2000), np.random.default_rng(0), 1000, BundleFormatError, "leaky")
