"""Real DSO scale (issue 13), the input and output side: profiles read for the horizon only,
compact result files, sensitivities in a binary format, progress lines of a run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lfm_zonal import Horizon, load_grid, load_profiles


def _year_profiles(grid, horizon: Horizon) -> dict[str, pd.DataFrame]:
    """The profiles as they were computed before: SimBench's absolute values of the whole
    year, then the horizon's rows averaged per MTU."""
    import simbench as sb

    from lfm_zonal.grid.profiles import _simbench_rows

    rows = _simbench_rows(horizon)
    absolute = sb.get_absolute_values(grid.net, profiles_instead_of_study_cases=True)
    out = {}
    for element, column in (("load", "p_mw"), ("load", "q_mvar"), ("sgen", "p_mw")):
        values = absolute[(element, column)].reindex(columns=grid.net[element].index)
        out[f"{element}_{column}"] = values.to_numpy(float)[rows].mean(axis=1)
    return out


@pytest.mark.parametrize(
    ("start", "n_mtu", "mtu_minutes"),
    [("2016-04-16 00:00", 96, 15), ("2016-03-01 10:00", 3, 30), ("2016-12-31 22:00", 2, 60)],
)
def test_simbench_profiles_of_the_horizon_equal_those_of_the_year(start, n_mtu, mtu_minutes):
    grid = load_grid("1-MV-rural--0-sw")
    horizon = Horizon(start=start, n_mtu=n_mtu, mtu_minutes=mtu_minutes)
    profiles = load_profiles(grid, horizon)
    expected = _year_profiles(grid, horizon)
    for name, values in expected.items():
        got = getattr(profiles, name)
        assert got.shape == values.shape
        np.testing.assert_array_equal(got.to_numpy(), values)  # the same numbers, bit for bit
        assert got.index.equals(horizon.times)
    stored_q = grid.net.sgen.q_mvar.to_numpy(float)
    np.testing.assert_array_equal(profiles.sgen_q_mvar.to_numpy(), np.tile(stored_q, (n_mtu, 1)))


def test_simbench_profiles_scale_only_the_rows_of_the_horizon(monkeypatch):
    """The relative profiles are sliced before they are spread over the elements: no table of
    a year x elements is built (it was 4.9 GB on 1-MVLV-rural-all-0-sw)."""
    import simbench.networks.profiles as sbp

    seen = []
    original = sbp.get_absolute_profiles_from_relative_profiles

    def spy(net, element, column, relative_profiles=None, **kwargs):
        seen.append(len(relative_profiles))
        return original(net, element, column, relative_profiles=relative_profiles, **kwargs)

    monkeypatch.setattr(sbp, "get_absolute_profiles_from_relative_profiles", spy)
    grid = load_grid("1-MV-rural--0-sw")
    load_profiles(grid, Horizon(start="2016-04-16 00:00", n_mtu=4, mtu_minutes=30))
    assert seen == [8, 8, 8]  # load P, load Q, sgen P: 4 MTUs of two quarter hours each
