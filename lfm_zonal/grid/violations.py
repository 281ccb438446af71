"""The grid's limits and how far a state is beyond them: one definition for the base case,
the clearing's linear model, the AC check, the KPIs and the tender bridge.

A state is loading in percent per monitored branch and voltage magnitude in p.u. per
bus; the limits are the grid's ``loading_max_percent``, ``vm_min_pu`` and ``vm_max_pu``.
Every function here works on numpy arrays and pandas frames alike, and an MTU that did
not converge (NaN) stays NaN: it is never counted as within its limits.

**The violation layout** numbers the rows of one MTU: every monitored branch's loading
(``NetworkModel.branches`` order), then every bus's overvoltage, then every bus's
undervoltage (``NetworkModel.buses`` order). The linear model's rows, the clearing LP's
grid rows and the AC check's model excess use it (``split_layout``, ``layout_rows``).

**Violated** means beyond one tolerance, the same in every KPI and table:
``VIOLATION_TOLERANCE_LOADING_PERCENT`` (0.01 percentage points of loading) and
``VIOLATION_TOLERANCE_VM_PU`` (1e-5 p.u.). An excess within it is reported as 0.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

#: One tolerance for "violated" (every KPI, the residual table, the CLI warning):
#: loading in percentage points, voltage in p.u.
VIOLATION_TOLERANCE_LOADING_PERCENT = 0.01
VIOLATION_TOLERANCE_VM_PU = 1e-5


class Limits(Protocol):
    loading_max_percent: float
    vm_min_pu: float
    vm_max_pu: float


def beyond_limits(limits: Limits, loading_percent, vm_pu):
    """Signed distance beyond each limit: overload (pp), undervoltage and overvoltage (p.u.).

    Positive is beyond the limit, zero or negative within it.
    """
    return (
        loading_percent - limits.loading_max_percent,
        limits.vm_min_pu - vm_pu,
        vm_pu - limits.vm_max_pu,
    )


def excess(limits: Limits, loading_percent, vm_pu):
    """Overload (pp), undervoltage and overvoltage (p.u.) beyond the limits, 0 within them."""
    return tuple(np.maximum(d, 0.0) for d in beyond_limits(limits, loading_percent, vm_pu))


def violated(excess_value, tolerance: float):
    """The excess where it is beyond the tolerance, else 0 (NaN stays NaN: not converged)."""
    within = excess_value <= tolerance  # False for NaN
    return excess_value * ~within


def violated_state(limits: Limits, loading_percent, vm_pu):
    """Overload (pp) and voltage deviation (p.u., under plus over) beyond the tolerances."""
    over, under, overv = excess(limits, loading_percent, vm_pu)
    return (
        violated(over, VIOLATION_TOLERANCE_LOADING_PERCENT),
        violated(under, VIOLATION_TOLERANCE_VM_PU) + violated(overv, VIOLATION_TOLERANCE_VM_PU),
    )


def largest_per_mtu(
    t: np.ndarray, r: np.ndarray, value: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Of rows (t, r), the n of largest ``value`` in each MTU, ordered by MTU, then value
    (largest first), then row."""
    order = np.lexsort((r, -value, t))
    t, r = t[order], r[order]
    keep = np.arange(len(t)) - np.searchsorted(t, t, side="left") < n
    return t[keep], r[keep]


def split_layout(
    r: np.ndarray, n_branch: int, n_bus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``r`` of the violation layout as (a branch's loading row, an upper limit: a
    loading or overvoltage row, the branch's or the bus's position)."""
    is_branch = r < n_branch
    return is_branch, r < n_branch + n_bus, np.where(is_branch, r, (r - n_branch) % n_bus)


def layout_rows(
    is_branch: np.ndarray, upper: np.ndarray, position: np.ndarray, n_branch: int, n_bus: int
) -> np.ndarray:
    """The rows of the violation layout of branch or bus rows (``split_layout``'s inverse)."""
    return np.where(is_branch, position, n_branch + np.where(upper, 0, n_bus) + position)
