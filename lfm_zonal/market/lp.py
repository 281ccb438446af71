"""What a clearing LP returns: its status, effort and solution (HiGHS).

The LP itself is ``market.formulation``; how it is solved (row and column generation,
the sequential AC loop) is ``market.strategies``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum

import highspy
import numpy as np

from lfm_zonal.errors import SolverError


class SolveStatus(StrEnum):
    """How a clearing ended: its value is the ``solver_status`` KPI.

    ``OPTIMAL`` is the one LP outcome with a solution. ``NOTHING_TO_CLEAR`` (no MTU with
    a violation) and ``MERIT_ORDER`` (the needs-based market) are clearings without an
    LP. Every other member is a HiGHS model status other than optimal, in HiGHS's words.
    """

    OPTIMAL = "optimal"
    NOTHING_TO_CLEAR = "nothing to clear"
    MERIT_ORDER = "merit order"
    NOT_SET = "Not Set"
    LOAD_ERROR = "Load error"
    MODEL_ERROR = "Model error"
    PRESOLVE_ERROR = "Presolve error"
    SOLVE_ERROR = "Solve error"
    POSTSOLVE_ERROR = "Postsolve error"
    MODEL_EMPTY = "Empty"
    INFEASIBLE = "Infeasible"
    UNBOUNDED_OR_INFEASIBLE = "Primal infeasible or unbounded"
    UNBOUNDED = "Unbounded"
    OBJECTIVE_BOUND = "Bound on objective reached"
    OBJECTIVE_TARGET = "Target for objective reached"
    TIME_LIMIT = "Time limit reached"
    ITERATION_LIMIT = "Iteration limit reached"
    UNKNOWN = "Unknown"
    SOLUTION_LIMIT = "Solution limit reached"
    INTERRUPT = "Interrupted by user"
    MEMORY_LIMIT = "Memory limit reached"
    HIGHS_INTERRUPT = "Interrupted by HiGHS"

    @classmethod
    def of(cls, highs: highspy.Highs) -> SolveStatus:
        """The model status of HiGHS's last run (``UNKNOWN`` for a status it adds later)."""
        status = highs.getModelStatus()
        if status == highspy.HighsModelStatus.kOptimal:
            return cls.OPTIMAL
        try:
            return cls(highs.modelStatusToString(status))
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True)
class SolveStats:
    """What clearing LPs took (summed over the LPs solved) and the size of the last one (its
    MTU blocks together, ``beside``)."""

    rounds: int = 0  # LP solves: constraint-generation rounds
    column_rounds: int = 0  # clearing LPs: column-generation rounds
    build_s: float = 0.0  # building the market side, handing it over, adding grid rows
    solve_s: float = 0.0  # HiGHS runs, wall clock
    highs_s: float = 0.0  # HiGHS runs, HiGHS's own clock
    simplex_iterations: int = 0
    # Size of the last LP solved to optimality (0 where none was).
    n_variables: int = 0
    n_constraints: int = 0
    n_nonzeros: int = 0
    n_grid_rows: int = 0

    def __add__(self, later: SolveStats) -> SolveStats:
        """The effort of both (rounds, times, iterations summed) and the size of ``later``."""
        size = {f.name for f in fields(self) if f.name.startswith("n_")}
        return SolveStats(
            **{
                f.name: getattr(later, f.name)
                if f.name in size
                else getattr(self, f.name) + getattr(later, f.name)
                for f in fields(self)
            }
        )

    def beside(self, other: SolveStats) -> SolveStats:
        """Two blocks of one LP solved apart: effort and sizes summed."""
        return SolveStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


@dataclass(frozen=True)
class Solution:
    """What a clearing LP returns (arrays aligned with its inputs)."""

    status: SolveStatus
    accepted_mw: np.ndarray  # per bid
    p_mw: np.ndarray  # (T, K) net area injections
    q_mvar: np.ndarray
    slack_mw: np.ndarray  # (T,) unmet need in MW-equivalent: sum of slack / g per MTU
    marginal_price: np.ndarray  # (T, K) EUR/MWh of active up injection in each area (from duals)
    marginal_price_q: np.ndarray  # (T, K) EUR/Mvarh of reactive injection (zero without Q)
    objective_eur: float
    stats: SolveStats = SolveStats()
    basis: MarketBasis | None = None  # where the LP ended, to warm-start the next one
    #: The grid rows with a dual price (the optimum rests on them), (MTU position, row in
    #: the violation layout) pairs: the next LP on these MTUs (of these bids, or the
    #: DSO-needs LP's) starts with them (``solve_clearing``'s ``rows``).
    rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    #: (T,) the MTUs whose duals carry the model's prices, not only offers': a grid row
    #: priced at its slack's penalty (need left unmet), a bound of the sequential LP's trust
    #: region (a step limit of the algorithm), or a battery taken in part in the MTU whose
    #: energy links it to one of those.
    #: Pay-as-clear caps their prices (``clearing.clearing_prices``).
    priced_by_model: np.ndarray | None = None
    #: The |dual| of each of ``rows`` (EUR per MW-equivalent: what the objective would be
    #: less were the row's limit one MW-equivalent wider) and its slack taken (MW-equivalent).
    row_duals: np.ndarray = field(default_factory=lambda: np.zeros(0))
    row_slack_mw: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: A bound of the sequential LP's trust region has a dual: the optimum rests on it.
    trust_bound: bool = False


@dataclass(frozen=True)
class MarketBasis:
    """Simplex basis status (HiGHS codes) of an LP's market side: per bid step (at a bound
    where it was left out) and per storage row.

    An LP of the same market against another linearisation starts from it (HiGHS
    completes it into a valid basis: new grid rows basic, new columns at a bound), so a
    sequential-LP round or a column-generation round re-optimises instead of
    solving from scratch."""

    bid_status: np.ndarray
    row_status: np.ndarray


def require_optimal(sol: Solution, lp: str) -> Solution:
    """``sol`` when its LP was solved to optimality; else a SolverError naming ``lp``."""
    if sol.status is not SolveStatus.OPTIMAL:
        raise SolverError(f"{lp}: solver status {sol.status.value}")
    return sol
