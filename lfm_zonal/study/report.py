"""The main job's report (``report.md``) and its warnings on violations left after the AC
check, from a study's KPI and residual tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lfm_zonal.check.kpis import REPORT_COLUMNS
from lfm_zonal.grid.violations import VIOLATION_TOLERANCE_LOADING_PERCENT, VIOLATION_TOLERANCE_VM_PU
from lfm_zonal.report.html_map import plotly_available
from lfm_zonal.study.job import StudyResult, base_case_summary


def has_k_comparison(kpis: pd.DataFrame) -> bool:
    """Whether the results compare zone counts (k_comparison.png): some market has zones;
    a nodal market alone has no K to compare."""
    return bool((kpis.method != "nodal").any())


def residual_warnings(kpis: pd.DataFrame, residual: pd.DataFrame, limit: int = 4) -> list[str]:
    """One line per market that leaves a violation after the AC check (or an MTU whose AC
    check did not converge): how many, where (elements named, worst first), for how many
    the offers were short (and exhausted), and the residual MW-equivalent it leaves."""
    lines = []
    for rec in kpis.itertuples(index=False):
        label = "nodal" if rec.method == "nodal" else f"{rec.method} K = {rec.k}"
        rows = (
            residual[(residual.method == rec.method) & (residual.k == rec.k)]
            if len(residual)
            else residual
        )
        failed = int(getattr(rec, "mtus_not_converged_after", 0))
        if rows.empty and not failed:
            continue
        parts = []
        if len(rows):
            worst = rows.sort_values("residual_mw", ascending=False, kind="stable").drop_duplicates(
                ["element_type", "element", "violation"]
            )
            named = [
                f"{r.element_type} {int(r.element)} ({r.violation} "
                + (f"{r.excess:.3g} pp" if r.violation == "overload" else f"{r.excess:.3g} p.u.")
                + ")"
                for r in worst.head(limit).itertuples(index=False)
            ]
            more = len(worst) - len(named)
            exhausted = rows.offers_exhausted.eq(True)
            short = rows.offers_short.eq(True)
            missed = rows.missed_by_model.eq(True)
            parts.append(
                f"{len(rows)} violation(s) left after the AC check in {rows.mtu.nunique()} MTU(s): "
                + ", ".join(named)
                + (f" and {more} more" if more > 0 else "")
                + f"; offers short for {int(short.sum())} of them"
                + f" (exhausted for {int(exhausted.sum())})"
                + f", missed by its model for {int(missed.sum())}"
                + f"; residual {float(rec.residual_mwh):.3g} MWh-equivalent"
            )
        if failed:
            parts.append(f"AC check did not converge in {failed} MTU(s)")
        lines.append(f"{label}: " + "; ".join(parts))
    return lines


def report_markdown(
    study: StudyResult, kpis: pd.DataFrame, worst: int | None, residual: pd.DataFrame
) -> str:
    """report.md: the scenario, its base case, the KPI table (``kpis``), the violations left
    (``residual``, residual_violations.csv) and the worst MTU ``worst``."""
    base = study.base
    pf = base.powerflow
    b = base_case_summary(pf)
    table = kpis[list(REPORT_COLUMNS)].copy()
    lines = [
        f"# {base.scenario.name}",
        "",
        base.scenario.values[""]["description"] or "",
        "",
        f"Grid **{base.grid.name}** ({base.grid.origin}); {base.profiles.horizon.n_mtu} MTUs of "
        f"{base.profiles.horizon.mtu_minutes} min from {base.profiles.horizon.start}, profiles "
        f"{base.profiles.source}; limits {base.grid.vm_min_pu}-{base.grid.vm_max_pu} p.u., "
        f"{base.grid.loading_max_percent:g}% loading; {len(study.resources)} resources.",
        "",
        f"Base case: max loading {b['loading_max_percent']:.1f}% ({b['mtus_with_overload']} MTUs "
        f"overloaded), voltage {b['vm_min_pu']:.3f}-{b['vm_max_pu']:.3f} p.u. "
        f"({b['mtus_with_voltage_violation']} MTUs out of band).",
        "",
        "## Markets (after the AC check)",
        "",
        _markdown_table(table),
        "",
        _pricing(kpis),
        "",
        "Residuals are measured by an AC power flow of the real dispatch; the nodal market is "
        "the benchmark. A row is violated beyond "
        f"{VIOLATION_TOLERANCE_LOADING_PERCENT:g} pp of loading or {VIOLATION_TOLERANCE_VM_PU:g} "
        "p.u. of voltage. Unmet need is the larger of the MW the DSO still misses in the linear "
        "model after the clearing and the AC residual in MW-equivalent (reported, never hidden). "
        "The security-adjusted cost adds that AC residual priced at the penalty of unmet need "
        f"({_penalty(kpis)}).",
        "",
        *(
            ["![cost and residuals against K](k_comparison.png)", ""]
            if has_k_comparison(kpis)
            else []
        ),
        "## Violations left after the AC check",
        "",
    ]
    warnings = residual_warnings(kpis, residual, limit=8)
    if warnings:
        lines += [f"* {w}" for w in warnings]
        lines += [
            "",
            "Each (MTU, element) is in `residual_violations.csv`, with its excess, its residual MW "
            "(excess over the element's largest nodal sensitivity to an injection), the relief "
            "the offers could still give (`relief_left`: the relieving offers' MW not "
            "dispatched, and the dispatch that worsens the element withdrawn) and whether the "
            "offers were short (`offers_short`: that relief is less than the excess) or "
            "exhausted (every resource that relieves the element dispatched in full). Short: "
            "the flexibility offered cannot fix it, whatever its price; not short: the market "
            "chose not to, at its prices, or its model did not see it. `model_excess` is what "
            "the market's own model (its linearised grid, its zones) expected to be left: "
            "the excess, where its model foresaw the violation and left it as unmet need at "
            "its prices and penalty; less, by more than the tolerance, where its model missed "
            "it (`missed_by_model`).",
            "",
        ]
    else:
        lines += ["None: every market leaves every element within its limits.", ""]
    if worst is not None:
        lines += [
            f"Worst MTU: {worst} ({pf.times[worst]}), plotted before and after: the largest "
            "base-case overload in pp plus 100 x voltage deviation in p.u. (`worst_mtu` of "
            "summary.json; the zones' worst MTU below weighs violations in MW-equivalent).",
            "",
            "![before and after](before_after.png)",
            "",
        ]
    seg = study.segmentation
    lines += [
        f"Zones at MTU {seg.reference_mtu} ({pf.times[seg.reference_mtu]}), reference MTU rule "
        f"{seg.reference_rule}.",
        "",
        "Zones: see `zones/` (maps `zones_k<K>.png`"
        + (", interactive `zones_k<K>.html`" if plotly_available() else "")
        + ", error curve `error_curve.png`).",
        "",
    ]
    return "\n".join(lines)


def _pricing(kpis: pd.DataFrame) -> str:
    """What ``cost_eur`` is: the pricing rule, and the other rule's cost of each market."""
    clear = set(kpis.pricing) == {"pay_as_clear"}
    other = kpis.cost_pay_as_bid_eur if clear else kpis.cost_pay_as_clear_eur
    labels = [
        "nodal" if r.method == "nodal" else f"{r.method} K = {r.k}"
        for r in kpis.itertuples(index=False)
    ]
    listed = ", ".join(f"{label} {cost:.2f}" for label, cost in zip(labels, other, strict=True))
    rule = (
        "each accepted step of the nodal and zonal markets paid the marginal price of its "
        "area, MTU and direction from the LP's duals, at least its offer, at most the dearest "
        "accepted offer where the duals carry the penalty of unmet need or the sequential "
        "LP's trust region; each zone and direction of a needs-based market paid its "
        "dearest accepted step (README: pay-as-clear prices)"
    )
    if clear:
        return f"Costs are pay-as-clear: {rule}. Pay-as-bid, in EUR: {listed}."
    return (
        "Costs are pay-as-bid: each accepted step is paid its offer. Pay-as-clear "
        f"({rule}), in EUR: {listed}."
    )


def _penalty(kpis: pd.DataFrame) -> str:
    values = sorted(set(kpis.penalty_eur_per_mwh)) if "penalty_eur_per_mwh" in kpis else []
    return ", ".join(f"{v:g} EUR/MWh" for v in values) or "none"


#: From this size on, a report's number is written whole, without an exponent (EUR, MWh).
WHOLE_FROM = 1e4


def report_number(v) -> str:
    """A number of a report's table: 4 significant digits, whole from WHOLE_FROM on (11395
    EUR, not 1.14e+04), tiny values with an exponent (1.954e-05 p.u.); "" for NaN."""
    if isinstance(v, float):
        if np.isnan(v):
            return ""
        return f"{v:.0f}" if abs(v) >= WHOLE_FROM else f"{v:.4g}"
    return str(v)


def _markdown_table(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = [
        "| " + " | ".join(report_number(v) for v in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows])
