"""The grid's limits and how far a state is beyond them: one definition for the base case,
the clearing's linear model, the AC check, the KPIs and the tender bridge.

**Violated** means beyond one tolerance, the same in every KPI and table:
``VIOLATION_TOLERANCE_LOADING_PERCENT`` (0.01 percentage points of loading) and
``VIOLATION_TOLERANCE_VM_PU`` (1e-5 p.u.). An excess within it is reported as 0.
"""

from __future__ import annotations

#: One tolerance for "violated" (every KPI, the residual table, the CLI warning):
#: loading in percentage points, voltage in p.u.
VIOLATION_TOLERANCE_LOADING_PERCENT = 0.01
VIOLATION_TOLERANCE_VM_PU = 1e-5
