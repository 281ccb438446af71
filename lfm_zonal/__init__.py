"""lfm-zonal: zonal and nodal local flexibility markets on distribution grids.

The folders are the pipeline's stages, in the order data flows through them::

    grid/    sources, profiles, AC power flow per MTU, sensitivities, linearised grid
    check/   AC check of a dispatch: violations left, residual in MW-equivalent
    zones/   segmentation into connected zones, zonal indices
    market/  resources, bids, DSO needs, the clearing LP, the sequential AC loop
    tender/  probabilistic tender sizing and its bridge to a real grid's zones
    study/   scenario, main job, sweep, golden regression
    cli.py   the command line

Below them: ``errors``, ``config`` (typed scenario), ``limits`` (machine sizing),
``files/`` (reading inputs, writing outputs) and ``report/`` (plots). A stage imports
only the stages above it in this list and the modules below them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lfm_zonal.errors import GridError, InputError, LfmError, PowerFlowNotConverged, SolverError

# The stage modules load pandapower, pandas and SciPy: they are imported when first used
# (``from lfm_zonal import load_grid``), so ``import lfm_zonal.<light module>`` stays fast
# and the command line can answer Ctrl-C while it starts.
_LAZY = {
    "Grid": "grid.sources",
    "available_grids": "grid.sources",
    "load_grid": "grid.sources",
    "HorizonPowerFlow": "grid.powerflow",
    "run_horizon": "grid.powerflow",
    "Horizon": "grid.profiles",
    "Profiles": "grid.profiles",
    "load_profiles": "grid.profiles",
    "SENSITIVITY_METHODS": "config",
    "Sensitivities": "grid.sensitivity",
    "sensitivities": "grid.sensitivity",
}

if TYPE_CHECKING:
    from lfm_zonal.grid.powerflow import HorizonPowerFlow, run_horizon
    from lfm_zonal.grid.profiles import Horizon, Profiles, load_profiles
    from lfm_zonal.grid.sensitivity import SENSITIVITY_METHODS, Sensitivities, sensitivities
    from lfm_zonal.grid.sources import Grid, available_grids, load_grid


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
    "SolverError",
    "available_grids",
    "load_grid",
    "load_profiles",
    "run_horizon",
    "sensitivities",
]
__version__ = "0.1.0"
