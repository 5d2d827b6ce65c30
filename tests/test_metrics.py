"""vqdiff.metrics: the exact batched BUAN score against dipy, MDF and the simple paired metrics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqdiff.metrics import (
    buan_score,
    buan_score_dipy,
    mdf,
    mean_mdf,
    mean_pointwise_distance,
    mse,
)

TOL = 1e-6


def _data_dir() -> Path:
    env = os.environ.get("VQDIFF_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


SUBJECT = _data_dir() / "subject01"


@pytest.fixture(scope="module")
def groups() -> np.ndarray:
    """All real groups: consecutive chunks of 64 streamlines of every bundle, (194, 64, 64, 3) float32."""
    from vqdiff.io import file_order_groups

    files = sorted(SUBJECT.glob("*.trk")) if SUBJECT.is_dir() else []
    if not files:
        pytest.skip(f"real data not found at {SUBJECT} (set VQDIFF_SHARED_DATA to ../shared/data)")
    return file_order_groups(files)


def _assert_parity(x, y, **kw) -> np.ndarray:
    ref = buan_score_dipy(x, y, **kw)
    fast = buan_score(x, y, **kw)
    err = np.abs(np.asarray(fast) - np.asarray(ref))
    assert err.max() <= TOL, f"max |fast - dipy| = {err.max()} at group {int(np.argmax(err))}"
    return np.asarray(ref)


# --------------------------------------------------------------------------------------------
# BUAN parity with dipy on real data
# --------------------------------------------------------------------------------------------
def test_buan_parity_real_groups(groups):
    """All 194 real groups with noisy reconstructions, plus float64, flipped, padded and collapsed."""
    rng = np.random.default_rng(0)
    G = len(groups)
    assert G == 194
    sigmas = np.array([0.5, 1.0, 2.0, 3.0, 5.0, 10.0])[np.arange(G) % 6]
    noisy = (groups + rng.normal(size=groups.shape) * sigmas[:, None, None, None]).astype(np.float32)
    pick = rng.choice(G, 40, replace=False)
    x = groups[pick]
    # float64 reconstructions (dipy resamples them in float64)
    f64 = x + rng.normal(0.0, 2.5, x.shape)
    # half the streamlines reversed (MDF is flip-invariant, so BUAN is too)
    flipped = (x + rng.normal(0.0, 1.0, x.shape)).astype(np.float32)
    flipped[:, ::2] = flipped[:, ::2, ::-1]
    # padded groups: 20 streamlines repeated up to 64 (3-4 copies each), some copies reversed
    padded = x[:, np.arange(64) % 20].copy()
    padded[:, 30:36] = padded[:, 30:36, ::-1]
    padded_rec = (padded + rng.normal(0.0, 1.5, x.shape)).astype(np.float32)
    padded_rec[:, 40:] = padded_rec[:, np.arange(40, 64) % 8]

    xs = np.concatenate([groups, x, x, padded, padded_rec])
    ys = np.concatenate([noisy, f64, flipped, padded_rec, padded])
    ref = _assert_parity(xs, ys)
    assert len(ref) >= 200
    assert ((ref > 0.05) & (ref < 0.95)).sum() >= 20, "scores should spread over (0, 1)"
    assert (ref >= 0.95).sum() >= 20 and (ref <= 0.05).sum() >= 20

    # a reconstruction that collapses every streamline to the group mean (64 duplicates); the
    # threshold is raised so that the score is not trivially 0
    mean = np.repeat(x[:16].mean(axis=1, keepdims=True), 64, axis=1)
    for T in (15.0, 30.0):
        ref = _assert_parity(x[:16], mean, threshold=T)
        _assert_parity(mean, x[:16], threshold=T)
    assert ((ref > 0.05) & (ref < 0.95)).any()


def test_buan_parity_other_thresholds_and_seeds(groups):
    rng = np.random.default_rng(1)
    x = groups[rng.choice(len(groups), 12, replace=False)]
    y = (x + rng.normal(0.0, 2.0, x.shape)).astype(np.float32)
    for T in (1.0, 3.0, 8.0):
        _assert_parity(x, y, threshold=T)
    padded = x[:, np.arange(64) % 13].copy()
    padded[:, 20:26] = padded[:, 20:26, ::-1]
    for seed in (1, 7):  # the clustering order only matters for duplicates; it is reproduced
        _assert_parity(padded, y, seed=seed)


def test_buan_torch_and_single_group(groups):
    x = groups[:3]
    y = x + np.float32(0.8)
    ref = buan_score_dipy(x, y)
    np.testing.assert_allclose(buan_score(torch.from_numpy(x), torch.from_numpy(y)), ref, atol=TOL)
    single = buan_score(x[0], y[0])
    assert isinstance(single, float)
    assert abs(single - ref[0]) <= TOL
    assert isinstance(buan_score_dipy(x[0], y[0]), float)


# --------------------------------------------------------------------------------------------
# BUAN edge cases
# --------------------------------------------------------------------------------------------
def _synthetic(G=3, S=16, P=32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, 1.0, (G, S, P, 3)) + np.array([1.5, 0.0, 0.0])
    return (np.cumsum(steps, axis=2) + rng.normal(0, 10, (G, S, 1, 3))).astype(np.float32)


def test_buan_identical_is_one():
    x = _synthetic()
    np.testing.assert_array_equal(buan_score(x, x), np.ones(len(x)))
    assert buan_score(x[0], x[0].copy(), threshold=0.01) == 1.0


def test_buan_nonpositive_threshold_is_zero():
    x = _synthetic()
    np.testing.assert_array_equal(buan_score(x, x, threshold=0.0), np.zeros(len(x)))
    assert buan_score(x[0], x[0], threshold=-1.0) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        buan_score(x, x, threshold=float("nan"))


def test_buan_zero_length_streamline_and_infinite_threshold(recwarn):
    x = _synthetic(G=2, S=8, P=16)
    z = x.copy()
    z[:, 3] = z[:, 3, :1]  # all points equal: dipy's resampling is undefined there
    s = buan_score(z, x + np.float32(0.5))
    assert s.shape == (2,) and np.all((s >= 0) & (s <= 1))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    np.testing.assert_array_equal(buan_score(x, x + 1000.0, threshold=np.inf), [1.0, 1.0])


def test_buan_far_apart_is_zero():
    x = _synthetic()
    assert np.all(buan_score(x, x + 100.0) == 0.0)


@pytest.mark.parametrize("fn", [buan_score, mdf, mean_mdf, mean_pointwise_distance, mse])
def test_shape_validation(fn):
    x = _synthetic(G=2, S=4, P=8)
    with pytest.raises(ValueError, match=r"\(G, S, P, 3\) or \(S, P, 3\)"):
        fn(x, x[:, :3])
    with pytest.raises(ValueError, match=r"\(G, S, P, 3\) or \(S, P, 3\)"):
        fn(x[..., :2], x[..., :2])
    with pytest.raises(ValueError, match=r"\(G, S, P, 3\) or \(S, P, 3\)"):
        fn(x[0, 0], x[0, 0])
    with pytest.raises(ValueError, match=r"\(G, S, P, 3\) or \(S, P, 3\)"):
        fn(x[None], x[None])
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fn(bad, x)


def test_buan_needs_two_points():
    x = _synthetic(G=1, S=4, P=8)[:, :, :1]
    with pytest.raises(ValueError, match="P >= 2"):
        buan_score(x, x)


# --------------------------------------------------------------------------------------------
# hypothesis: small random groups, including duplicates and reversed copies
# --------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    S=st.integers(1, 8),
    P=st.integers(4, 12),
    scale=st.sampled_from([0.5, 3.0, 20.0]),
    sigma=st.sampled_from([0.0, 0.3, 2.0, 8.0]),
    dup=st.booleans(),
    as_f64=st.booleans(),
    threshold=st.sampled_from([1.0, 5.0, 12.0]),
)
def test_buan_matches_dipy_random_small_groups(seed, S, P, scale, sigma, dup, as_f64, threshold):
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, scale, (2, S, P, 3)) + scale * np.array([1.0, 0.2, 0.0])
    x = np.cumsum(steps, axis=2) + rng.normal(0.0, 3 * scale, (2, S, 1, 3))
    y = x + rng.normal(0.0, sigma, x.shape)
    if dup and S > 1:
        k = rng.integers(1, S)
        x[:, k:] = x[:, rng.integers(0, k, S - k)]
        x[:, -1] = x[:, -1, ::-1]
    x = x.astype(np.float32)
    y = y if as_f64 else y.astype(np.float32)
    _assert_parity(x, y, threshold=threshold)


# --------------------------------------------------------------------------------------------
# MDF and the simple paired metrics
# --------------------------------------------------------------------------------------------
def test_mdf_matches_dipy_diagonal(groups):
    from dipy.tracking.distances import bundles_distances_mdf

    rng = np.random.default_rng(2)
    x = groups[:4]
    y = (x + rng.normal(0.0, 2.0, x.shape)).astype(np.float32)
    y[:, ::3] = y[:, ::3, ::-1]
    got = mdf(x, y)
    assert got.shape == (4, 64)
    for g in range(4):
        ref = np.diag(bundles_distances_mdf(list(x[g]), list(y[g])))
        np.testing.assert_allclose(got[g], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean_mdf(x, y), got.mean(axis=1))
    assert mdf(x[0], y[0]).shape == (64,)
    assert isinstance(mean_mdf(x[0], y[0]), float)


def test_mdf_flip_invariance_and_pointwise_detects_flip():
    x = _synthetic()
    rev = x[:, :, ::-1]
    np.testing.assert_allclose(mdf(x, rev), 0.0, atol=1e-12)
    noisy = x + np.float32(0.5)
    np.testing.assert_allclose(mdf(x, noisy[:, :, ::-1]), mdf(x, noisy), rtol=1e-12)
    # flip-sensitive: a reversed streamline is far from the original (these span ~45 mm)
    assert np.all(mean_pointwise_distance(x, rev) > 10.0)
    np.testing.assert_allclose(mean_pointwise_distance(x, x), 0.0)


def test_mse_and_pointwise_values():
    x = np.zeros((2, 3, 4, 3))
    y = x.copy()
    y[..., 0] = 3.0
    y[..., 1] = 4.0  # every point 5 mm away
    np.testing.assert_allclose(mean_pointwise_distance(x, y), [5.0, 5.0])
    np.testing.assert_allclose(mse(x, y), [25.0 / 3, 25.0 / 3])
    np.testing.assert_allclose(mdf(x, y), 5.0)
    assert mse(x[0], y[0]) == pytest.approx(25.0 / 3)
    np.testing.assert_allclose(mse(torch.from_numpy(x), torch.from_numpy(y)), mse(x, y))
