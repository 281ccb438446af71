"""lfm-zonal: zonal and nodal local flexibility markets on distribution grids.

Pipeline (one module per stage)::

    grids -> profiles -> powerflow (per MTU) -> sensitivity -> segmentation
    -> needs -> bids -> clearing -> validation -> kpis / plots
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lfm_zonal.errors import GridError, InputError, LfmError, PowerFlowNotConverged

# The stage modules load pandapower, pandas and SciPy: they are imported when first used
# (``from lfm_zonal import load_grid``), so ``import lfm_zonal.<light module>`` stays fast
# and the command line can answer Ctrl-C while it starts.
_LAZY = {
    "Grid": "grids",
    "available_grids": "grids",
    "load_grid": "grids",
    "HorizonPowerFlow": "powerflow",
    "run_horizon": "powerflow",
    "Horizon": "profiles",
    "Profiles": "profiles",
    "load_profiles": "profiles",
    "SENSITIVITY_METHODS": "config",
    "Sensitivities": "sensitivity",
    "sensitivities": "sensitivity",
}

if TYPE_CHECKING:
    from lfm_zonal.grids import Grid, available_grids, load_grid
    from lfm_zonal.powerflow import HorizonPowerFlow, run_horizon
    from lfm_zonal.profiles import Horizon, Profiles, load_profiles
    from lfm_zonal.sensitivity import SENSITIVITY_METHODS, Sensitivities, sensitivities


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"lfm_zonal.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lfm_zonal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "SENSITIVITY_METHODS",
    "Grid",
    "GridError",
    "Horizon",
    "HorizonPowerFlow",
    "InputError",
    "LfmError",
    "PowerFlowNotConverged",
    "Profiles",
    "Sensitivities",
    "available_grids",
    "load_grid",
    "load_profiles",
    "run_horizon",
    "sensitivities",
]
__version__ = "0.1.0"
