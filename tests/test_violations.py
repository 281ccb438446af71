"""The one definition of "beyond a limit" (grid/violations.py), by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from lfm_zonal.grid.violations import beyond_limits, excess, violated, violated_state

LIMITS = SimpleNamespace(loading_max_percent=100.0, vm_min_pu=0.95, vm_max_pu=1.05)


def test_excess_and_the_tolerance_by_hand():
    loading = np.array([[99.0, 100.005, 101.5, np.nan]])
    vm = np.array([[0.94, 0.949995, 1.0, 1.06]])
    over, under, overv = excess(LIMITS, loading, vm)
    np.testing.assert_allclose(over, [[0.0, 0.005, 1.5, np.nan]])
    np.testing.assert_allclose(under, [[0.01, 5e-6, 0.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(overv, [[0.0, 0.0, 0.0, 0.01]], atol=1e-12)
    # Within 0.01 pp / 1e-5 p.u. is not violated; a diverged value stays unknown (NaN).
    o, dev = violated_state(LIMITS, loading, vm)
    np.testing.assert_allclose(o, [[0.0, 0.0, 1.5, np.nan]])
    np.testing.assert_allclose(dev, [[0.01, 0.0, 0.0, 0.01]], atol=1e-12)


def test_signed_distance_and_pandas_frames():
    loading = pd.DataFrame([[90.0, 110.0]], columns=["a", "b"])
    vm = pd.DataFrame([[1.0, 0.9]], columns=["x", "y"])
    over, under, overv = beyond_limits(LIMITS, loading, vm)
    assert over.iloc[0].tolist() == [-10.0, 10.0]
    np.testing.assert_allclose(under.iloc[0], [-0.05, 0.05])
    np.testing.assert_allclose(overv.iloc[0], [-0.05, -0.15])
    kept = violated(excess(LIMITS, loading, vm)[0], 0.01)
    assert isinstance(kept, pd.DataFrame) and kept.iloc[0].tolist() == [0.0, 10.0]
