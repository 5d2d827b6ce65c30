import nibabel as nib
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from vqdiff.canonical import (
    canonical_order,
    canonicalise,
    orientation_flips,
    reflect_pad,
    resample,
    sort_group,
    sort_groups,
    uncanonicalise,
    zero_length_streamlines,
)
from vqdiff.errors import BundleFormatError


def _inverse(c, **kw):
    return uncanonicalise(c.groups, c.order, c.pad_mask, c.flipped, **kw)


def test_real_bundle_round_trip(subject_dir):
    streamlines = list(nib.streamlines.load(subject_dir / "IFOF_R.trk").streamlines)
    assert len(streamlines) == 2880
    c = canonicalise(streamlines)
    assert c.groups.shape == (45, 64, 64, 3) and c.groups.dtype == np.float32
    assert c.pad_mask.all()
    back = _inverse(c)
    assert len(back) == 2880
    err = max(np.abs(a - b).max() for a, b in zip(back, streamlines, strict=True))
    assert err <= 1e-4


def test_ordering_puts_similar_streamlines_side_by_side(subject_dir):
    streamlines = np.stack(nib.streamlines.load(subject_dir / "MCP.trk").streamlines)
    c = canonicalise(list(streamlines))
    g = c.groups
    neighbour = np.linalg.norm(g[:, 1:] - g[:, :-1], axis=-1).mean()
    file_order = streamlines[: len(g) * 64].reshape(g.shape)
    baseline = np.linalg.norm(file_order[:, 1:] - file_order[:, :-1], axis=-1).mean()
    assert neighbour < 0.5 * baseline


def test_orientation_is_consistent_and_order_independent(subject_dir):
    streamlines = np.stack(nib.streamlines.load(subject_dir / "PYT_L.trk").streamlines)
    rng = np.random.default_rng(0)
    flip = rng.random(len(streamlines)) < 0.5
    scrambled = np.where(flip[:, None, None], streamlines[:, ::-1], streamlines)
    f1 = orientation_flips(streamlines)
    f2 = orientation_flips(scrambled)
    oriented1 = np.where(f1[:, None, None], streamlines[:, ::-1], streamlines)
    oriented2 = np.where(f2[:, None, None], scrambled[:, ::-1], scrambled)
    np.testing.assert_array_equal(oriented1, oriented2)
    perm = rng.permutation(len(streamlines))
    np.testing.assert_array_equal(orientation_flips(streamlines[perm]), f1[perm])


def test_padding_is_reflection_of_real_streamlines():
    rng = np.random.default_rng(1)
    streamlines = [rng.normal(size=(64, 3)).astype(np.float32) + i for i in range(70)]
    c = canonicalise(streamlines)
    assert c.groups.shape == (2, 64, 64, 3)
    assert c.pad_mask.sum() == 70 and not c.pad_mask[70:].any()
    tail = c.order[64:70]
    np.testing.assert_array_equal(c.order[70:76], tail[::-1])  # mirror of the real tail
    np.testing.assert_array_equal(c.order[76:82], tail[::-1])  # wrapped


def test_resample_changes_point_count_and_restore_points():
    rng = np.random.default_rng(2)
    streamlines = [np.cumsum(rng.normal(size=(n, 3)), axis=0).astype(np.float32) for n in (2, 5, 64, 200)]
    x = resample(streamlines)
    assert x.shape == (4, 64, 3)
    c = canonicalise(streamlines)
    back = _inverse(c, n_points=c.n_points)
    assert [len(s) for s in back] == [2, 5, 64, 200]
    for orig, b in zip(streamlines, back, strict=True):  # endpoints are kept by resampling
        np.testing.assert_allclose(b[[0, -1]], orig[[0, -1]], atol=1e-4)


def test_bad_streamlines_are_refused():
    with pytest.raises(BundleFormatError, match="at least 2 points"):
        canonicalise([np.zeros((1, 3), np.float32)])
    with pytest.raises(BundleFormatError) as e:
        canonicalise([])
    assert e.value.reason == "empty"


def test_zero_length_streamline_is_a_named_error():
    rng = np.random.default_rng(3)
    streamlines = [rng.normal(size=(10, 3)).astype(np.float32), np.ones((5, 3), np.float32)]
    with pytest.raises(BundleFormatError, match="zero length") as e:
        canonicalise(streamlines)
    assert e.value.reason == "zero_length"


def test_inverse_rejects_inconsistent_metadata():
    streamlines = [np.random.default_rng(i).normal(size=(64, 3)).astype(np.float32) for i in range(10)]
    c = canonicalise(streamlines)
    order = c.order.copy()
    order[0] = order[1]
    with pytest.raises(ValueError, match="permutation"):
        uncanonicalise(c.groups, order, c.pad_mask, c.flipped)


streamline = st.integers(min_value=2, max_value=80).flatmap(
    lambda n: st.lists(
        st.tuples(*[st.floats(-150, 150, allow_nan=False, width=32)] * 3), min_size=n, max_size=n
    )
)


@settings(max_examples=40, deadline=None)
@given(st.lists(streamline, min_size=1, max_size=150))
def test_round_trip_property(raw):
    streamlines = [np.asarray(s, dtype=np.float32) for s in raw]
    assume(all(np.any(s[1:] != s[:-1]) for s in streamlines))  # zero-length ones are refused (tested above)
    c = canonicalise(streamlines)
    n = len(streamlines)
    assert c.groups.shape[0] == -(-n // 64)
    assert c.pad_mask.sum() == n
    back = _inverse(c)
    expected = resample(streamlines)
    assert len(back) == n
    for b, e in zip(back, expected, strict=True):
        np.testing.assert_allclose(b, e, atol=1e-4)


# --- equivalence with the straightforward per-group algorithm --------------------------------------


def _ref_pc1(x):
    """The original per-group projection: SVD for few rows, else the covariance's eigenvector."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    flat = flat - flat.mean(axis=0)
    if len(flat) < 2:
        return np.zeros(len(flat))
    if len(flat) < flat.shape[1]:
        axis = np.linalg.svd(flat, full_matrices=False)[2][0]
    else:
        axis = np.linalg.eigh(flat.T @ flat)[1][:, -1]
    return flat @ (-axis if axis[np.argmax(np.abs(axis))] < 0 else axis)


def _ref_canonicalise(streamlines, group_size=64):
    """Oracle: loops per streamline and per group. Returns (oriented, flipped, order, local projections)."""
    with threadpool_limits(1):  # its many small LAPACK calls crawl with several BLAS threads on a busy host
        return _ref_canonicalise_loops(streamlines, group_size)


def _ref_canonicalise_loops(streamlines, group_size):
    from dipy.tracking.streamline import set_number_of_points

    arrays = [np.ascontiguousarray(s, dtype=np.float32) for s in streamlines]
    if all(len(a) == 64 for a in arrays):
        x = np.stack(arrays)
    else:
        x = np.stack(set_number_of_points(arrays, nb_points=64)).astype(np.float32)
    x64 = x.astype(np.float64)
    d = x64[:, -1] - x64[:, 0]
    a = np.linalg.eigh(d.T @ d)[1][:, -1]
    a = -a if a[np.argmax(np.abs(a))] < 0 else a
    first = d @ a < 0
    centroid = np.where(first[:, None, None], x64[:, ::-1], x64).mean(axis=0)
    direct = np.linalg.norm(x64 - centroid, axis=2).mean(axis=1)
    flipped = np.linalg.norm(x64[:, ::-1] - centroid, axis=2).mean(axis=1) < direct
    oriented = np.where(flipped[:, None, None], x[:, ::-1], x)
    perm = np.argsort(_ref_pc1(oriented), kind="stable")
    local = np.zeros(len(perm))
    for start in range(0, len(perm), group_size):
        chunk = perm[start : start + group_size]
        proj = _ref_pc1(oriented[chunk])
        keep = np.argsort(proj, kind="stable")
        perm[start : start + group_size], local[start : start + group_size] = chunk[keep], proj[keep]
    return oriented, flipped, perm, local


def assert_matches_reference(streamlines, group_size=64):
    """canonicalise == the oracle: same flips, same order up to exact-enough ties, same groups."""
    c = canonicalise(streamlines, group_size=group_size)
    oriented, flipped, perm, local = _ref_canonicalise(streamlines, group_size)
    n = len(perm)
    np.testing.assert_array_equal(c.flipped, flipped)
    np.testing.assert_array_equal(c.pad_mask[:n], True)
    got = c.order[:n]
    for g in range(0, n, group_size):  # the same streamlines in every group
        np.testing.assert_array_equal(np.sort(got[g : g + group_size]), np.sort(perm[g : g + group_size]))
    ties = 0
    for k in np.flatnonzero(got != perm):  # a different slot only where the oracle's projections tie
        g = k // group_size * group_size
        scale = np.abs(local[g : g + group_size]).max()
        where = {int(i): j for j, i in enumerate(perm[g : g + group_size], start=g)}
        assert abs(local[where[int(got[k])]] - local[k]) <= 1e-9 * scale, f"slot {k} differs without a tie"
        ties += 1
    np.testing.assert_allclose(c.groups.reshape(-1, 64, 3), oriented[c.order], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(c.n_points, [len(s) for s in streamlines])
    return ties


def test_matches_reference_on_every_real_bundle(subject_dir):
    files = sorted(subject_dir.glob("*.trk"))
    assert len(files) == 12
    ties = [assert_matches_reference(list(nib.streamlines.load(f).streamlines)) for f in files]
    assert sum(ties) == 0  # on the real data the orders are identical


@pytest.mark.parametrize("n, seed", [(1, 0), (2, 1), (17, 2), (63, 3), (64, 4), (65, 5), (130, 6), (300, 7)])
def test_matches_reference_on_synthetic_bundles_with_varied_point_counts(n, seed):
    rng = np.random.default_rng(seed)
    base = np.cumsum(rng.normal(size=(120, 3)), axis=0) * 3
    streamlines = []
    for i in range(n):  # noisy copies of one curve, some reversed, cut to 2..120 points
        k = int(rng.integers(2, 121)) if seed % 2 else 64
        s = (base[np.linspace(0, 119, k).astype(int)] + rng.normal(scale=2.0, size=(k, 3)) + i * 0.01)
        streamlines.append((s[::-1] if rng.random() < 0.5 else s).astype(np.float32))
    assert_matches_reference(streamlines)


def test_identical_streamlines_keep_file_order():
    s = np.cumsum(np.random.default_rng(8).normal(size=(64, 3)), axis=0).astype(np.float32)
    c = canonicalise([s] * 70)
    np.testing.assert_array_equal(c.order[:70], np.arange(70))  # every projection is 0: stable sorts
    assert not c.flipped.any()


# --- the public helpers -----------------------------------------------------------------------------


def test_canonical_order_is_what_canonicalise_groups(subject_dir):
    streamlines = list(nib.streamlines.load(subject_dir / "POPT_R.trk").streamlines)
    oriented, flipped, perm, n_points = canonical_order(streamlines)
    c = canonicalise(streamlines)
    assert oriented.dtype == np.float32 and oriented.shape == (len(streamlines), 64, 3)
    np.testing.assert_array_equal(flipped, c.flipped)
    np.testing.assert_array_equal(perm, c.order[: len(perm)])
    np.testing.assert_array_equal(oriented[perm], c.groups.reshape(-1, 64, 3)[: len(perm)])
    assert perm.dtype == np.int64 and n_points.dtype == np.int64


def test_sort_group_is_the_within_group_step():
    rng = np.random.default_rng(9)
    groups = (rng.normal(size=(5, 64, 64, 3)) + np.linspace(0, 30, 64)[None, :, None, None]).astype(np.float32)
    groups = groups[:, rng.permutation(64)]
    with threadpool_limits(1):
        for g in groups:
            np.testing.assert_array_equal(sort_group(g), g[np.argsort(_ref_pc1(g), kind="stable")])
    np.testing.assert_array_equal(sort_groups(groups), np.stack([sort_group(g) for g in groups]))


def test_reflect_pad():
    np.testing.assert_array_equal(reflect_pad(3, 8), [2, 1, 0, 2, 1])
    np.testing.assert_array_equal(reflect_pad(1, 4), [0, 0, 0])
    assert reflect_pad(64, 64).size == 0
    for bad in (0, 65):
        with pytest.raises(ValueError):
            reflect_pad(bad, 64)


def test_zero_length_streamlines():
    rng = np.random.default_rng(10)
    ok = rng.normal(size=(5, 3)).astype(np.float32)
    streamlines = [ok, np.ones((4, 3), np.float32), ok, np.zeros((1, 3), np.float32), ok[[0, 0, 1]]]
    np.testing.assert_array_equal(zero_length_streamlines(streamlines), [1, 3])
    assert zero_length_streamlines([ok]).size == 0
    from vqdiff.bundle import Bundle, SpatialHeader

    np.testing.assert_array_equal(zero_length_streamlines(Bundle(streamlines, SpatialHeader.identity())), [1, 3])


@pytest.mark.parametrize(
    "bad, reason, index",
    [
        ([0, "nan", "one"], "non_finite", 1),
        ([0, "one", "nan"], "too_few_points", 1),
        ([0, "nan_one"], "too_few_points", 1),  # one streamline: point count before finiteness
        (["nan", "flat"], "non_finite", 0),
        ([0, "flat", "nan"], "bad_shape", 1),
        ([0, 0, "vector"], "bad_shape", 2),
    ],
)
def test_validation_names_the_first_bad_streamline(bad, reason, index):
    ok = np.arange(12, dtype=np.float32).reshape(4, 3)
    make = {0: ok, "nan": np.where(ok == 4, np.nan, ok), "one": ok[:1], "nan_one": np.full((1, 3), np.nan),
            "flat": ok[:, :2], "vector": ok[0]}
    with pytest.raises(BundleFormatError) as e:
        canonicalise([make[b] for b in bad])
    assert e.value.reason == reason and f"streamline {index} " in str(e.value)


def test_validation_accepts_nested_lists_and_returns_the_points():
    from vqdiff.bundle import validate_streamlines

    points, lengths = validate_streamlines([[[0, 0, 0], [1, 1, 1]], np.ones((3, 3))])
    assert points.shape == (5, 3) and lengths.tolist() == [2, 3]


def test_top_eigvecs_agrees_with_lapack_even_on_awkward_matrices():
    from vqdiff.pca import top_eigvecs

    rng = np.random.default_rng(11)
    x = rng.normal(size=(20, 64, 30)) * rng.uniform(0.1, 10, size=(20, 1, 30))
    m = x @ x.transpose(0, 2, 1)  # rank 30 of 64, as a centred Gram matrix is rank-deficient
    hidden = np.zeros((40, 40))  # the top eigenvalue (2.9) sits in a block away from the largest variance
    hidden[:20, :20] = np.diag(np.linspace(1, 2.5, 20))
    hidden[20:22, 20:22] = [[1.5, 1.4], [1.4, 1.5]]
    for mats in (m, hidden[None], np.zeros((2, 40, 40))):
        u = top_eigvecs(mats)
        ref = np.linalg.eigh(mats)[1][..., -1]
        assert np.isfinite(u).all()
        if mats.any():
            np.testing.assert_allclose(np.abs(np.einsum("gi,gi->g", u, ref)), 1, atol=1e-12)


def test_top_right_vector_agrees_with_lapack_and_both_pc1_paths_order_alike(subject_dir, monkeypatch):
    """The implicit Lanczos (``x.T x`` never formed) finds LAPACK's vector on rank-deficient, hidden
    and zero rows; a bundle too large for it (forced here) takes the covariance path: the same order."""
    from vqdiff import pca

    rng = np.random.default_rng(12)
    low = rng.normal(size=(30, 192)) * rng.uniform(0.1, 10, size=(1, 192))  # 30 rows: rank 30 of 192
    hidden = np.zeros((22, 40))  # rows whose x.T x is the block matrix of the test above
    hidden[np.arange(20), np.arange(20)] = np.sqrt(np.linspace(1, 2.5, 20))
    hidden[20:22, 20:22] = np.linalg.cholesky([[1.5, 1.4], [1.4, 1.5]]).T
    for x in (low, hidden, rng.normal(size=(500, 192)), np.zeros((5, 40))):
        u = pca.top_right_vector(x)
        assert np.isfinite(u).all()
        if x.any():
            ref = np.linalg.eigh(x.T @ x)[1][:, -1]
            np.testing.assert_allclose(abs(u @ ref), 1, atol=1e-12)
    flat = resample(list(nib.streamlines.load(sorted(subject_dir.glob("*.trk"))[0]).streamlines)).reshape(-1, 192)
    implicit = pca.pc1_projections(flat)
    monkeypatch.setattr(pca, "IMPLICIT_BYTES", 0)
    covariance = pca.pc1_projections(flat)
    np.testing.assert_allclose(implicit, covariance, rtol=0, atol=1e-9 * np.abs(covariance).max())
    np.testing.assert_array_equal(np.argsort(implicit, kind="stable"), np.argsort(covariance, kind="stable"))


def test_restored_point_counts_keep_the_model_points_in_place():
    """Restoring the input's point counts interpolates at the original's fractions: taken back at 64
    fractions, a reconstruction with irregular spacing is where it was (dipy's arc-length resampling
    would slide its points along the track)."""
    from vqdiff.bundle import Bundle, SpatialHeader
    from vqdiff.canonical import at_fractions, restore_point_counts
    from vqdiff.quality import at_model_points

    rng = np.random.default_rng(5)
    t = np.linspace(0, 1, 64)
    base = np.stack([100 * t, 20 * np.sin(3 * t), np.zeros(64)], -1)
    x = (base[None] + rng.normal(0, 0.4, (6, 64, 3))).astype(np.float32)  # irregular spacing, like a decoder's
    back = restore_point_counts(x, np.array([64, 100, 100, 37, 2, 100]))
    assert [len(s) for s in back] == [64, 100, 100, 37, 2, 100]
    assert np.array_equal(back[0], x[0])
    for s, orig in zip(back, x, strict=True):
        np.testing.assert_array_equal(s[[0, -1]], orig[[0, -1]])  # endpoints exactly
    up = at_fractions(x[1:2], 127)  # every second point of 127 is one of the 64
    np.testing.assert_allclose(up[0, ::2], x[1], atol=1e-5)
    # the quality figures take a restored reconstruction back to (nearly) the model's own points
    bundle = Bundle([s for s in x], SpatialHeader.identity())
    recon = Bundle(restore_point_counts(x, np.full(6, 100)), SpatialHeader.identity())
    _, y = at_model_points(bundle, recon)
    from dipy.tracking.streamline import set_number_of_points

    slid = np.stack(set_number_of_points([np.ascontiguousarray(s) for s in recon.streamlines], nb_points=64))
    moved, slide = np.linalg.norm(y - x, axis=-1), np.linalg.norm(slid - x, axis=-1)
    assert moved.mean() < 0.2 and moved.max() < 0.5  # corner cutting only (here 0.15 / 0.46 mm)
    assert slide.mean() > 4 * moved.mean()  # arc-length resampling slides them (0.92 mm here)
    with pytest.raises(ValueError, match="at least 2"):
        restore_point_counts(x, np.array([64, 1, 3, 3, 3, 3]))
