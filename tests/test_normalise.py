import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vqdiff.normalise import Normalisation


def test_fit_maps_training_data_into_unit_box():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(1000, 3)) * [30, 80, 20] + [0, 10, -20]
    norm = Normalisation.fit(pts)
    y = norm.apply(pts)
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    assert np.isclose(np.abs(y).max(), 1.0, atol=1e-6)
    assert Normalisation.from_dict(norm.to_dict()) == norm


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (20, 3), elements=st.floats(-500, 500)), arrays(np.float32, (7, 3), elements=st.floats(-500, 500, width=32)))
def test_inverse_is_exact(train, x):
    if np.ptp(train, axis=0).max() < 1e-3:
        return
    norm = Normalisation.fit(train)
    np.testing.assert_allclose(norm.invert(norm.apply(x)), x, atol=1e-4 + 1e-6 * np.abs(x).max())


def test_out_of_range_reports_numbers():
    norm = Normalisation.fit(np.array([[-1, -1, -1], [1, 1, 1.0]]) * 100)
    assert norm.out_of_range(np.zeros((5, 3))) is None
    report = norm.out_of_range(np.full((5, 3), 1000.0))
    assert report["fraction_points_outside"] == 1.0 and report["input_max"] == [1000.0] * 3


def test_refuses_degenerate_or_unknown():
    with pytest.raises(ValueError, match="zero extent"):
        Normalisation.fit(np.ones((4, 3)))
    with pytest.raises(ValueError, match="accepted"):
        Normalisation.from_dict({"kind": "zscore"})
