"""The one definition of "beyond a limit" (grid/violations.py), by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from lfm_zonal.grid.linear import LinearGrid
from lfm_zonal.grid.violations import (
    beyond_limits,
    excess,
    layout_rows,
    split_layout,
    violated,
    violated_state,
)

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


def test_the_violation_layout_by_hand():
    """Three branches and two buses: rows 0-2 the loadings, 3-4 the overvoltages, 5-6 the
    undervoltages, as ``LinearGrid.violations`` lays them out; ``layout_rows`` inverts."""
    loading = np.array([[90.0, 101.0, 100.0]])
    vm = np.array([[1.06, 0.94]])
    row = LinearGrid.violations(LIMITS, loading, vm)[0]
    r = np.arange(7)
    is_branch, upper, at = split_layout(r, 3, 2)
    assert is_branch.tolist() == [True] * 3 + [False] * 4
    assert upper.tolist() == [True] * 5 + [False] * 2
    assert at.tolist() == [0, 1, 2, 0, 1, 0, 1]
    by_hand = np.where(
        is_branch,
        loading[0, np.minimum(at, 2)] - 100.0,
        np.where(upper, vm[0, np.minimum(at, 1)] - 1.05, 0.95 - vm[0, np.minimum(at, 1)]),
    )
    np.testing.assert_allclose(row, by_hand)
    np.testing.assert_array_equal(layout_rows(is_branch, upper, at, 3, 2), r)
