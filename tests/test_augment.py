"""Augmentations (vqdiff.training.augment): the math, its bounds, determinism, and exact sampler resume."""

import math

import numpy as np
import pytest

from vqdiff.canonical import orientation_flips, sort_group
from vqdiff.slr import ROTATION_DEG, SCALE_RANGE, TRANSLATION_MM
from vqdiff.training.augment import (
    Augmentation,
    Draw,
    ElasticField,
    apply_draw,
    mid_sagittal_x,
    mirror,
    mirror_name,
    orientation_axis,
    rotation_matrix,
    transform,
)
from vqdiff.training.data import BundleData, GroupSampler

ALL_ON = Augmentation(rotate_deg=15, scale_range=(0.9, 1.1), aniso_scale=0.05, shear=0.05, translate_mm=5,
                      mirror_prob=0.5, elastic_mm=3, jitter_mm=0.3)


def _bundle(name: str, x0: float, n: int = 200, seed: int = 0, subject: str = "s1") -> BundleData:
    """Synthetic oriented streamlines (n, 64, 3): arcs running along +y from x = x0, bulging laterally
    (left bundles to -x, right ones to +x: a mirror pair about the midpoint of their x0), canonical order."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, 64)
    off = rng.normal(size=(n, 1, 3)) * [4, 2, 3]
    side = -1.0 if name.endswith("_L") else 1.0
    pts = np.stack([x0 + side * 10 * np.sin(np.pi * t), 80 * t - 40, 15 * np.sin(2 * np.pi * t)], -1)[None] + off
    pts = pts.astype(np.float32)
    return BundleData(name, subject, 0, pts[np.argsort(pts[:, 0, 0], kind="stable")],
                      np.zeros((0, 64, 64, 3), np.float32))


def _group(seed=0) -> np.ndarray:
    return sort_group(_bundle("X_L", -40.0, n=64, seed=seed).train)


def _pairwise(x):
    p = x.reshape(-1, 3)
    return np.linalg.norm(p[:, None] - p[None], axis=-1)


def test_mirroring_twice_is_the_identity_and_swaps_names():
    g = _group()
    for cx in (0.0, -27.7, 13.25):
        once = mirror(g, cx)
        assert once.dtype == g.dtype and np.allclose(once[..., 0], 2 * cx - g[..., 0], atol=1e-4)
        np.testing.assert_array_equal(once[..., 1:], g[..., 1:])
        np.testing.assert_allclose(mirror(once, cx), g, atol=1e-4)
    # through the whole pipeline (re-orientation and re-sorting included): twice = the canonical group itself
    only = Augmentation(mirror_prob=1.0)
    rng = np.random.default_rng(0)
    once, d = only.apply(g, rng, mirror_x=-27.7, axis=orientation_axis(g))
    assert d.mirrored
    twice, _ = only.apply(once, rng, mirror_x=-27.7, axis=orientation_axis(once))
    np.testing.assert_allclose(twice, g, atol=1e-4)
    for name, other in (("IFOF_L", "IFOF_R"), ("sub-1__PYT_R", "sub-1__PYT_L"), ("CST_left", "CST_right")):
        assert mirror_name(name) == other and mirror_name(other) == name
    for midline in ("MCP", "CC_Fr_1", "AC", "SLF_II"):
        assert mirror_name(midline) == midline


def test_similarity_preserves_shape_up_to_scale():
    g = _group().astype(np.float64)
    aug = Augmentation(rotate_deg=ROTATION_DEG, scale_range=SCALE_RANGE, translate_mm=TRANSLATION_MM)
    rng = np.random.default_rng(1)
    d0 = _pairwise(g[:8])
    for _ in range(5):
        d = aug.draw(rng, g.shape)
        s = d.scale
        assert SCALE_RANGE[0] <= s <= SCALE_RANGE[1]
        np.testing.assert_allclose(d.linear.T @ d.linear, s * s * np.eye(3), atol=1e-12)  # s x a rotation
        assert np.linalg.det(d.linear) > 0 and np.all(np.abs(d.translation) <= TRANSLATION_MM)
        x, _ = transform(g, d)
        np.testing.assert_allclose(_pairwise(x[:8]), s * d0, rtol=1e-9, atol=1e-9)
        # rotation angles within the bound: the angle of R is at most that of three 30-degree turns
        np.testing.assert_allclose(x.reshape(-1, 3).mean(0), g.reshape(-1, 3).mean(0) + d.translation, atol=1e-9)


def test_affine_stays_small_and_anisotropic():
    rng = np.random.default_rng(2)
    aug = Augmentation(aniso_scale=0.15, shear=0.15)
    sv = np.linalg.svd(np.stack([aug.draw(rng).linear for _ in range(200)]), compute_uv=False)
    assert sv.max() < 1.45 and sv.min() > 0.65 and (sv.max(1) / sv.min(1)).max() > 1.1  # not a similarity


def test_elastic_displacement_is_bounded_by_its_amplitude_and_smooth():
    rng = np.random.default_rng(3)
    pts = rng.uniform(-500, 500, size=(20000, 3))
    for amp, lam in ((3.0, 80.0), (6.0, 80.0), (1.0, 20.0)):
        for _ in range(10):
            f = ElasticField.random(rng, amp, lam)
            u = f.displacement(pts)
            norm = np.linalg.norm(u, axis=1)
            assert f.bound_mm == pytest.approx(amp) and norm.max() <= amp + 1e-9
            assert norm.max() > 0.25 * amp  # not trivially small
            lip = 2 * math.pi * amp / lam
            assert f.lipschitz <= lip + 1e-9
            q = pts + rng.normal(size=pts.shape)
            ratio = np.linalg.norm(f.displacement(q) - u, axis=1) / np.linalg.norm(q - pts, axis=1)
            assert ratio.max() <= lip + 1e-9
    g = _group()
    x, _ = transform(g, Draw(elastic=ElasticField.random(rng, 4.0, 80.0)))
    assert np.linalg.norm(x - g, axis=-1).max() <= 4.0 + 1e-5


def test_bounds_come_from_the_registration_and_are_refused_beyond():
    Augmentation(rotate_deg=ROTATION_DEG, translate_mm=TRANSLATION_MM, scale_range=SCALE_RANGE)
    with pytest.raises(ValueError, match=f"{ROTATION_DEG}"):
        Augmentation(rotate_deg=ROTATION_DEG + 1)
    with pytest.raises(ValueError, match="translate_mm"):
        Augmentation(translate_mm=TRANSLATION_MM + 1)
    with pytest.raises(ValueError, match="scale"):
        Augmentation(scale_range=(SCALE_RANGE[0] - 0.1, 1.0))
    with pytest.raises(ValueError, match="strain"):
        Augmentation(elastic_mm=20, elastic_wavelength_mm=80)
    with pytest.raises(ValueError, match="mirror_prob"):
        Augmentation(mirror_prob=1.5)
    assert not Augmentation().active and ALL_ON.active


def test_draws_are_deterministic_given_the_seed_and_off_draws_nothing():
    g = _group()
    a1, d1 = ALL_ON.apply(g, np.random.default_rng(7), mirror_x=-27.0)
    a2, d2 = ALL_ON.apply(g, np.random.default_rng(7), mirror_x=-27.0)
    np.testing.assert_array_equal(a1, a2)
    assert d1.mirrored == d2.mirrored
    assert not np.array_equal(a1, ALL_ON.apply(g, np.random.default_rng(8), mirror_x=-27.0)[0])
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    off = Augmentation().draw(rng)
    assert rng.bit_generator.state == before and off.linear is None and not off.mirrored


def test_augmented_group_is_in_canonical_order():
    """After any transform the group is oriented as canonicalising the transformed bundle would orient it
    (the whole-bundle rule, checked on the transformed bundle) and sorted as sort_group sorts it."""
    b = _bundle("X_L", -40.0, n=256)
    b.train = np.ascontiguousarray(b.train[..., [1, 0, 2]])  # running along +x, as a commissure: mirroring reverses it
    axis = orientation_axis(b.train)
    rng = np.random.default_rng(4)
    seen = set()
    for _ in range(12):
        d = Augmentation(rotate_deg=30, mirror_prob=0.5).draw(rng, (256, 64, 3))
        x, lin = transform(b.train, d, mirror_x=-27.0)
        whole = orientation_flips(x.astype(np.float32)).mean()  # canonical orientation of the moved bundle
        out = apply_draw(b.train, d, mirror_x=-27.0, axis=axis)
        assert whole in (0.0, 1.0)
        reversed_ = np.allclose(np.sort(out[:, 0, 1]), np.sort(x[:, -1, 1].astype(np.float32)), atol=1e-4)
        assert reversed_ == (whole == 1.0)
        np.testing.assert_array_equal(sort_group(out), out)
        seen.add(reversed_)
    assert seen == {True, False}


def test_mid_sagittal_plane_from_left_right_pairs():
    bundles = {"A_L": _bundle("A_L", -60.0).train, "A_R": _bundle("A_R", 6.0).train,
               "B_L": _bundle("B_L", -45.0).train, "B_R": _bundle("B_R", -9.0).train,
               "MID": _bundle("MID", 100.0).train}
    x, how = mid_sagittal_x(bundles)
    expect = np.mean([(bundles["A_L"][..., 0].mean() + bundles["A_R"][..., 0].mean()) / 2,
                      (bundles["B_L"][..., 0].mean() + bundles["B_R"][..., 0].mean()) / 2])
    assert x == pytest.approx(expect) and "2 left/right pair" in how
    x, how = mid_sagittal_x({"MID": bundles["MID"]})
    assert "midrange" in how and x == pytest.approx((bundles["MID"][..., 0].min() + bundles["MID"][..., 0].max()) / 2)


def _sampler(augment, seed=5, **kw):
    return GroupSampler([_bundle("A_L", -50.0, seed=1), _bundle("A_R", -4.0, seed=2), _bundle("MCP", -27.0, seed=3)],
                        augment=augment, seed=seed, **kw)


def test_sampler_resume_is_exact_with_augmentations():
    s = _sampler(ALL_ON)
    assert s.mirror_planes["s1"]["x"] == pytest.approx(-27.0, abs=0.5)
    s.sample(4)
    state = s.state()
    after, names = s.sample_with_names(6)
    more = s.sample(3)
    t = _sampler(ALL_ON, seed=99)
    t.set_state(state)
    again, names2 = t.sample_with_names(6)
    np.testing.assert_array_equal(after, again)
    np.testing.assert_array_equal(more, t.sample(3))
    assert names == names2
    # mirrored groups carry the mirrored name: with mirror_prob 1 every lateral name is swapped
    m = _sampler(Augmentation(mirror_prob=1.0))
    _, swapped = m.sample_with_names(16)
    plain = _sampler(None)
    which = plain.rng.choice(3, size=16, p=plain.p)  # the bundles the mirroring sampler drew (same seed)
    assert swapped == [{"A_L": "A_R", "A_R": "A_L", "MCP": "MCP"}[plain.bundles[i].bundle] for i in which]


def test_sampler_without_augmentation_is_unchanged():
    a, b = _sampler(None), _sampler(Augmentation())
    np.testing.assert_array_equal(a.sample(5), b.sample(5))
    assert a.state() == b.state() and not b.mirror_planes


def test_rotation_matrix_is_a_rotation():
    r = rotation_matrix(np.deg2rad([30, -30, 10]))
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
