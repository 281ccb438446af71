"""lfm-zonal: zonal and nodal local flexibility markets on distribution grids.

Pipeline (one module per stage)::

    grids -> profiles -> powerflow (per MTU) -> sensitivity -> segmentation
    -> needs -> bids -> clearing -> validation -> kpis / plots
"""

from lfm_zonal.errors import GridError, InputError, LfmError, PowerFlowNotConverged
from lfm_zonal.grids import Grid, available_grids, load_grid
from lfm_zonal.powerflow import HorizonPowerFlow, run_horizon
from lfm_zonal.profiles import Horizon, Profiles, load_profiles
from lfm_zonal.sensitivity import SENSITIVITY_METHODS, Sensitivities, sensitivities

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
