import nibabel as nib
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vqdiff.canonical import canonicalise, orientation_flips, resample, uncanonicalise
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
