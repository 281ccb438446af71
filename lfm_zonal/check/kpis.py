"""The KPI schema: every column of ``kpis.csv``, once.

One row per KPI: its name (the column), unit, description, where it is shown (the
report's table, the terminal after ``lfm-zonal clear``), whether it is a wall-clock
time (left out of ``summary.json`` and ``sweep.csv``, so that the same inputs give the
same bytes) and, for the golden nodal results, the tolerance a change may move it by
(relative, absolute). ``kpis.csv`` columns come in this order; the README's KPI table is
``markdown_table()`` (a test keeps the two equal).

Residual KPIs count what is violated beyond the one tolerance of ``grid.violations``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KPI:
    name: str
    unit: str
    description: str
    report: bool = False  # a column of report.md's market table
    terminal: bool = False  # printed by `lfm-zonal clear`
    timing: bool = False  # wall-clock: not in summary.json nor sweep.csv
    golden: tuple[float, float] | None = None  # (relative, absolute) tolerance


# fmt: off
KPIS: tuple[KPI, ...] = (
    KPI("method", "", "market: nodal, zonal or needs_based", report=True, terminal=True),
    KPI("k", "", "number of market areas (zones; buses for nodal)", report=True, terminal=True),
    KPI("cost_eur", "EUR", "cost of the accepted bids under the scenario's pricing",
        report=True, terminal=True, golden=(1e-4, 1e-4)),
    KPI("security_adjusted_cost_eur", "EUR",
        "cost_eur plus residual_mwh priced at penalty_eur_per_mwh", report=True),
    KPI("activated_mwh", "MWh", "flexibility activated (accepted MW x MTU length)",
        report=True, terminal=True, golden=(1e-3, 1e-4)),
    KPI("unmet_mwh", "MWh",
        "per MTU the larger of the linear model's unmet need and the AC residual MW, summed",
        report=True, terminal=True, golden=(0.0, 1e-3)),
    KPI("residual_overload_max_percent", "pp",
        "largest overload left after the AC check (beyond the tolerance)",
        report=True, terminal=True, golden=(0.0, 0.05)),
    KPI("residual_voltage_max_pu", "p.u.",
        "largest voltage deviation from the band left after the AC check",
        report=True, terminal=True, golden=(0.0, 2e-4)),
    KPI("residual_overload_mtu_count", "MTUs", "MTUs with an overload left after the AC check"),
    KPI("vm_min_after_pu", "p.u.", "lowest bus voltage after the AC check",
        terminal=True, golden=(0.0, 2e-4)),
    KPI("vm_max_after_pu", "p.u.", "highest bus voltage after the AC check",
        terminal=True, golden=(0.0, 2e-4)),
    KPI("new_violations", "rows",
        "(MTU, element) rows violated after the AC check that were not before",
        report=True, terminal=True, golden=(0.0, 0.0)),
    KPI("segmentation_error", "",
        "capacity-weighted relative error of the zonal indices against the nodal "
        "sensitivities at the reference MTU (the zones' error curve at this K; 0 for nodal)",
        report=True),
    KPI("solve_s", "s", "HiGHS time of every LP of the market", timing=True),
    KPI("n_variables", "",
        "columns of the market's last sequential-LP round (all its MTU blocks; margin "
        "rounds solve parts of it)"),
    KPI("n_constraints", "",
        "rows of the market's last sequential-LP round (all its MTU blocks)"),
    KPI("pricing", "", "pay_as_bid or pay_as_clear"),
    KPI("residual_mwh", "MWh",
        "AC residual in MW-equivalent (largest excess / sensitivity per MTU) x MTU length"),
    KPI("penalty_eur_per_mwh", "EUR/MWh", "price of unmet need in the LP and the adjusted cost"),
    KPI("residual_violations", "rows", "(MTU, element) rows still violated after the AC check"),
    KPI("residual_elements", "elements", "elements still violated in some MTU"),
    KPI("residual_offers_exhausted", "rows",
        "residual rows where every relieving offer was dispatched in full"),
    KPI("cost_pay_as_bid_eur", "EUR", "cost of the accepted bids at their own prices"),
    KPI("cost_pay_as_clear_eur", "EUR",
        "cost of the accepted bids at the clearing prices (duals, at least each offer)"),
    KPI("accepted_bids", "steps", "bid steps accepted in full or in part"),
    KPI("need_mwh", "MWh", "DSO need published for the market", golden=(1e-4, 1e-6)),
    KPI("unmet_mw_max", "MW", "largest unmet need of an MTU"),
    KPI("residual_overload_percent_h", "pp h", "overload left after the AC check x MTU length"),
    KPI("loading_max_after_percent", "%", "highest branch loading after the AC check"),
    KPI("residual_voltage_mtu_count", "MTUs", "MTUs with a voltage violation left"),
    KPI("residual_voltage_pu_h", "p.u. h", "voltage deviation left x MTU length"),
    KPI("mtus_not_converged_after", "MTUs",
        "MTUs whose AC check did not converge (left out of the maxima and sums)"),
    KPI("solver_status", "", "status of the market's last LP"),
    KPI("build_s", "s", "time to build the LPs", timing=True),
    KPI("clear_s", "s",
        "time of the clearing: its LPs, sequential AC loop and margin rounds (their AC "
        "checks included, the kept clearing's check not)", timing=True),
    KPI("generation_rounds", "", "LP solves over every LP and MTU block"),
    KPI("ac_rounds", "", "rounds of the sequential LP"),
    KPI("ac_best_round", "", "the round whose dispatch is returned (best merit in AC)"),
    KPI("ac_converged", "0/1", "1 when the sequential LP converged before its round cap"),
    KPI("column_rounds", "", "column-generation rounds over every LP and MTU block"),
    KPI("margin_rounds", "",
        "clearings after the first, each with margins on the rows_unmet_in_ac of the one "
        "before (market.strategies.RowMargins)"),
    KPI("rows_unmet_in_ac", "rows",
        "(MTU, row) pairs the AC check violates that the market's model met, or that the "
        "base case had within their limits (what margins are for)"),
)
# fmt: on

KPI_NAMES: tuple[str, ...] = tuple(k.name for k in KPIS)
REPORT_COLUMNS: tuple[str, ...] = tuple(k.name for k in KPIS if k.report)
TERMINAL_COLUMNS: tuple[str, ...] = tuple(k.name for k in KPIS if k.terminal)
TIMING_COLUMNS: tuple[str, ...] = tuple(k.name for k in KPIS if k.timing)
GOLDEN_TOLERANCES: dict[str, tuple[float, float]] = {
    k.name: k.golden for k in KPIS if k.golden is not None
}


def markdown_table() -> str:
    """The README's KPI table."""
    lines = ["| column | unit | meaning |", "|---|---|---|"]
    lines += [f"| `{k.name}` | {k.unit} | {k.description} |" for k in KPIS]
    return "\n".join(lines)
