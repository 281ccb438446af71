"""Segmentation benchmark: a full K sweep (1..N) reusing one hierarchy, and the methods compared.

    python benchmarks/bench_segmentation.py

For SimBench MV and a 1000-bus synthetic feeder: the time of a full sweep over
every K (zones, zonal indices and errors) with the hierarchy built once and cut at
every K, against scikit-learn's AgglomerativeClustering refitted for every K (the
"start over each time" baseline, timed on a sample of K and scaled). Then the
error at a few K of both segmentation methods, for the README.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import scipy.sparse as sp

from lfm_zonal import Horizon, load_grid, load_profiles, run_horizon
from lfm_zonal.zones.segmentation import prepare_segmentation

warnings.filterwarnings("ignore")


def sweep(name: str) -> None:
    from sklearn.cluster import AgglomerativeClustering

    grid = load_grid(name)
    pf = run_horizon(grid, load_profiles(grid, Horizon(n_mtu=96)))
    ref = int(pf.profiles.total_load_mw().to_numpy().argmax())
    t0 = time.perf_counter()
    seg = prepare_segmentation(pf, ref)
    t_prepare = time.perf_counter() - t0
    n = seg.n_buses
    t0 = time.perf_counter()
    curve = seg.error_curve()  # builds the hierarchy; errors at every K = 1..N in one pass
    t_sweep = time.perf_counter() - t0
    # Baseline: refit the clustering for each K (zones only), on a sample of K.
    pos = {b: i for i, b in enumerate(pf.model.buses)}
    e = np.array([(pos[a], pos[b]) for a, b in seg.graph.edges()])
    conn = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    conn = conn + conn.T
    sample = np.unique(np.linspace(1, n, 20).astype(int))
    t0 = time.perf_counter()
    for k in sample:
        AgglomerativeClustering(n_clusters=int(k), connectivity=conn, linkage="ward").fit(
            seg.features
        )
    t_refit = (time.perf_counter() - t0) / len(sample) * n
    t_cuts = time.perf_counter()
    for k in range(1, n + 1):
        seg.zones(k)
    t_cuts = time.perf_counter() - t_cuts
    print(
        f"  {name:<24} N = {n:>5}: sensitivities+features {t_prepare:5.2f} s | hierarchy + "
        f"error curve K = 1..N {t_sweep:5.2f} s | zones at every K: one hierarchy cut N times "
        f"{t_cuts:5.2f} s vs refit per K {t_refit:6.1f} s (sampled on {len(sample)} K) "
        f"-> {t_refit / t_cuts:4.0f}x"
    )
    for k in (2, 4, 8, 16, 32):
        if k <= n:
            a = curve.set_index("k").loc[k]
            s = seg.error_curve([k], "spectral").iloc[0]
            print(
                f"    K = {k:>3}: agglomerative loading {a.loading_error:.3f} voltage {a.vm_error:.3f}"
                f" | spectral loading {s.loading_error:.3f} voltage {s.vm_error:.3f}"
            )


def streamed(scenario: str = "simbench_mvlv_rural_pv_noon") -> None:
    """The error curve of a grid above EXACT_SEGMENTATION_MAX_BUSES (the streamed path, at
    CURVE_POINTS values of K): its time, and the bus columns each distinct zone of two or
    more buses takes against every zone of every K."""
    from lfm_zonal.files.inputs import shipped_toml_text
    from lfm_zonal.study.job import prepare_base_case, prepare_resources, prepare_segmentation_of
    from lfm_zonal.study.scenario import parse_scenario
    from lfm_zonal.zones.streamed import curve_ks, leaf_order

    base = prepare_base_case(parse_scenario(shipped_toml_text(scenario), scenario))
    seg = prepare_segmentation_of(base, prepare_resources(base))
    seg.zones(seg.n_parts)  # the hierarchy, outside the curve's time
    t0 = time.perf_counter()
    curve = seg.error_curve()
    seconds = time.perf_counter() - t0
    n = seg.n_buses
    order = leaf_order(seg.hierarchy.children, n)
    every, distinct = 0, set()
    for k in curve_ks(seg.n_parts, n)[:-1]:  # K = N: every zone one bus, no error to compute
        labels = np.unique(seg.hierarchy.labels(k), return_inverse=True)[1].ravel()[order]
        cuts = np.r_[0, np.flatnonzero(np.diff(labels)) + 1, n]
        every += n
        distinct |= {(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b - a > 1}
    columns = sum(b - a for a, b in distinct)
    print(
        f"  {scenario} ({n} buses, streamed): error curve at {len(curve)} values of K "
        f"{seconds:5.2f} s; bus columns {columns} (distinct zones of two or more buses) "
        f"of {every} (every zone of every K)"
    )


def main() -> int:
    print(
        "Full K sweep, one hierarchy (agglomerative) vs starting over for each K; methods compared"
    )
    for name in ("cigre_mv", "ieee33", "1-MV-rural--0-sw", "synthetic_radial_1000"):
        sweep(name)
    print("Error curve of a big grid (streamed)")
    streamed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
