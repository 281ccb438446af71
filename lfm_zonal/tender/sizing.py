"""Tender sizing under forecast uncertainty, with temporal and spatial aggregation (seed 001).

Vannoni et al., "Optimizing Local Flexibility Market Tenders: a probabilistic
approach to spatial and temporal aggregation". The DSO procures availability Q
against a probabilistic need and pays, per hour of the availability window
(its Eq. 1)::

    c(Q) = sum_i q_i p_av,i / 8760                       availability, pay-as-bid
         + w E[min(Q, Q_d)] p_act(Q)                    expected activation
         + w' E[(Q_d - Q)+] VoLL                        expected unmet need

with the need Q_d = max(L - C, 0), L ~ N(mu, sigma) the load and C the grid
capacity; q_i the offers cleared by merit order of availability price (the
marginal one divisible) and p_act(Q) the quantity-weighted mean activation price
of what is cleared, so c is not linear in Q. w is the utilisation factor;
w' = w by default (option ``w_on_voll``). Prices: availability in EUR per
MW-year, activation and VoLL in EUR/MWh; c is in EUR/h, so the MTU length
cancels out of the aggregation extra cost (Eq. 2)::

    c_aggr = (c_hat - sum_t c_min^t) / sum_t c_min^t * 100 %

Every quantity Q is searched on one candidate set per offer curve: 0, every
offer breakpoint, and ``points_per_offer`` evenly spaced points inside every
offer. Separate and aggregated optima are taken over the same candidates, so
c_aggr >= 0 holds exactly (it is a minimum of sums of non-negative terms) and
is exactly 0 for identical MTUs or a single node.

Where the paper is open, the reading is a named option of ``TenderParameters``
(defaults in brackets): price truncation to [0, cap] by resampling or clipping
[resample]; w on VoLL [on]; per-node offers of equal bid size, volume following
the count, or of equal volume [equal_bid_size]; the spatial sizing rule A (the
pooled Q that minimises the sum of true nodal costs) or B (sized on the pooled
need without nodal steering) [A].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from lfm_zonal.config import MAX_N_MTU, TenderParameters, tender_parameters
from lfm_zonal.errors import InputError
from lfm_zonal.files.inputs import parse_toml, read_input_text, shipped_toml_text, shipped_tomls
from lfm_zonal.limits import require_memory, truncated_normal

HOURS_PER_YEAR = 8760.0


# ----------------------------------------------------------------------------- parameters


# TenderParameters (Table I and the options, with their defaults and bounds) is one model of
# lfm_zonal.config, the single source of every input's type, default and bounds.


PARAMETER_SETS_FOLDER = "tender"


def parameter_sets() -> dict[str, str]:
    """Shipped parameter sets (TOML in scenarios/tender/), name -> description."""
    return shipped_tomls(PARAMETER_SETS_FOLDER)


def load_parameters(
    spec: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TenderParameters:
    """Parameters from a shipped set name or a TOML file (default: Table I), with overrides
    (``--set KEY=VALUE``: text is read as the parameter's type).

    Unknown keys, wrong types and values out of bounds (``config.TenderParameters``) are
    refused with one line naming the file (or ``command line``) and the key.
    """
    values: dict[str, Any] = {}
    origin = "tender parameters"
    if spec is not None:
        spec = str(spec)
        if not spec.endswith(".toml") and spec in parameter_sets():
            origin = f"builtin:{spec}"
            text = shipped_toml_text(spec, PARAMETER_SETS_FOLDER)
        else:
            path = Path(spec)
            if not path.exists():  # a folder or a device: read_input_text says which
                known = ", ".join(parameter_sets())
                raise InputError(f"tender parameters not found: {spec} (built-in sets: {known})")
            origin, text = str(path), read_input_text(path, "tender parameters TOML")
        values = parse_toml(text, origin)
        values.pop("description", None)
    return tender_parameters(values, origin, overrides)


# ----------------------------------------------------------------------------- request size

SPATIAL_ARRAYS_PER_CANDIDATE = 12  # measured peak (tracemalloc): 9-12 per offer x point
SPATIAL_ARRAYS_PER_OFFER_NODE = 6  # the completed-offers matrices, measured 5
TEMPORAL_ARRAYS_PER_CANDIDATE = 10  # per MTU x candidate, measured 6 (normal) to 9 (Monte Carlo)
OPTIMUM_ARRAYS_PER_CANDIDATE = 12  # measured 9-10
SAMPLE_ARRAYS = 4  # Monte Carlo draws, sorted copy, tail sums
VALUES_PER_ROW = 100  # one result row of a study (a dict of ~10 values), in 8-byte items
MAX_VALUES = 100_000  # values of one swept dimension (sigma_mu, MTU counts, Gini, nodes)
#: Seeds one study averages: 10,000 put a mean within 1% of a standard deviation; the
#: optimum study draws 1,000 in about 4 s, a million took hours without a word.
MAX_SEEDS = 10_000


def _values(values, name: str, kind: type, low: float, high: float | None = None):
    """Finite numbers in [low, high) (whole numbers for int), or an InputError naming them."""
    if len(values) > MAX_VALUES:  # before materialising a range of a billion
        raise InputError(f"{len(values)} values of {name} asked; at most {MAX_VALUES}")
    v = np.asarray(values, float).ravel()
    if v.size == 0:
        raise InputError(f"give at least one value of {name}")
    bad = ~np.isfinite(v) | (v < low) | ((v >= high) if high is not None else False)
    if kind is int:
        bad |= np.isfinite(v) & (v != np.round(v))
    if bad.any():
        span = f"in [{low:g}, {high:g})" if high is not None else f">= {low:g}"
        whole = " and whole" if kind is int else ""
        raise InputError(f"{name} must be finite{whole} and {span}, got {v[bad][0]:g}")
    return v


def check_seeds(seeds) -> None:
    """At least one seed, at most MAX_SEEDS (every tender study, the grid's too)."""
    if len(seeds) == 0:
        raise InputError("give at least one seed")
    if len(seeds) > MAX_SEEDS:
        raise InputError(f"seeds (--seeds): {len(seeds)} asked; at most {MAX_SEEDS}")


def check_tender_request(
    params: TenderParameters,
    study: str = "all",
    *,
    sigma_mu_mw=(0,),
    n_mtu=(1,),
    gini=(0.0,),
    n_nodes=(1,),
    seeds=(0,),
) -> float:
    """Refuse a study request that is malformed or would not fit in memory, before any draw.

    Values: sigma_mu finite >= 0, MTU and node counts whole >= 1, Gini indices in
    [0, 1), at least one seed. Memory (``limits.require_memory``): offers per node
    B = offered_volume_ratio / bid_size_ratio, M = points_per_offer candidates each,
    so the optimum holds B x M candidates, the temporal study max(n_mtu) x B x M,
    the spatial study N x B x M and N x B x N for the largest N, Monte Carlo needs
    mc_samples (x N for sizing rule B), plus the result rows. Returns the estimate
    in bytes.
    """
    studies = ("optimum", "temporal", "spatial") if study == "all" else (study,)
    check_seeds(seeds)
    b = max(1.0, params.offered_volume_ratio / params.bid_size_ratio)
    m = float(params.points_per_offer)
    offers, points = (b, "offers per node"), (m, "points per offer")
    monte_carlo = params.skewness != 0 or params.kurtosis != 3
    samples = (float(params.mc_samples), "Monte Carlo samples")
    n_seeds = (len(seeds), "seeds")
    terms = []
    if monte_carlo:
        terms.append([samples, (SAMPLE_ARRAYS, "arrays")])
    if "optimum" in studies:
        terms.append([offers, points, (OPTIMUM_ARRAYS_PER_CANDIDATE, "arrays")])
    if "temporal" in studies:
        sigmas = _values(sigma_mu_mw, "sigma_mu (--sigma-mu)", float, 0.0)
        mtus = _values(n_mtu, "n_mtu (--n-mtu)", int, 1.0, MAX_N_MTU + 1.0)  # a leap year
        t = (float(mtus.max()), "MTUs")
        terms.append([t, offers, points, (TEMPORAL_ARRAYS_PER_CANDIDATE, "arrays")])
        rows = [(len(sigmas), "sigma_mu"), (len(mtus), "MTU counts"), n_seeds]
        terms.append([*rows, (VALUES_PER_ROW, "values per row")])
    if "spatial" in studies:
        _values(gini, "gini (--gini)", float, 0.0, 1.0)
        nodes = _values(n_nodes, "n_nodes (--n-nodes)", int, 1.0)
        n = (float(nodes.max()), "nodes")
        terms.append([n, offers, points, (SPATIAL_ARRAYS_PER_CANDIDATE, "arrays")])
        terms.append([n, offers, n, (SPATIAL_ARRAYS_PER_OFFER_NODE, "arrays")])
        if params.sizing_rule == "B":
            terms.append([samples, n, (3, "arrays")])
        rows = [(len(gini), "Gini indices"), (len(nodes), "node counts"), n_seeds]
        terms.append([*rows, (VALUES_PER_ROW, "values per row")])
    return require_memory(
        f"tender {study}",
        terms,
        hint="lower points_per_offer, raise bid_size_ratio, or ask fewer MTUs, nodes or seeds",
    )


def _finite_costs(params: TenderParameters, costs: np.ndarray, where: str) -> None:
    """Refuse parameters whose expected costs overflow (inf or NaN) instead of writing them."""
    if not np.isfinite(costs).all():
        shown = ", ".join(
            f"{name} = {getattr(params, name):g}"
            for name in ("mu_mu_mw", "sigma_mw", "capacity_mw", "voll_eur_per_mwh")
        )
        raise InputError(
            f"tender parameters: the expected cost of the {where} is not finite ({shown}); "
            "give loads, deviations and prices of a physical size"
        )


# ----------------------------------------------------------------------------- the need


def normal_loss(z: np.ndarray) -> np.ndarray:
    """Standard normal loss function E[(Z - z)+] = phi(z) - z (1 - Phi(z))."""
    z = np.asarray(z, float)
    return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi) - z * ndtr(-z)


@dataclass(frozen=True)
class Need:
    """Flexibility need Q_d = max(L - C, 0) with L of mean ``mu_mw`` and deviation ``sigma_mw``.

    ``mu_mw`` may be an array (one entry per MTU or node): every method then
    broadcasts it against the quantities (result shape ``mu.shape + Q.shape``).
    The normal (skewness 0, kurtosis 3) uses the closed forms of the normal loss
    function; ``samples`` (standardised draws of L) switches to Monte Carlo.
    """

    mu_mw: np.ndarray | float
    sigma_mw: float
    capacity_mw: float
    samples: np.ndarray | None = None  # standardised load draws (mean 0, std 1)

    def _mu(self) -> np.ndarray:
        return np.asarray(self.mu_mw, float)[..., None]

    def expected_unmet(self, q_mw: np.ndarray) -> np.ndarray:
        """E[(Q_d - Q)+] in MW, for Q >= 0."""
        q = np.asarray(q_mw, float)
        mu = self._mu()
        if self.samples is not None:
            return self._mc_tail(mu, q)
        if self.sigma_mw == 0:
            return np.maximum(mu - self.capacity_mw - q, 0.0)
        return self.sigma_mw * normal_loss((self.capacity_mw + q - mu) / self.sigma_mw)

    def expected_need(self) -> np.ndarray:
        """E[Q_d] in MW."""
        return self.expected_unmet(np.zeros(1))[..., 0]

    def expected_activation(self, q_mw: np.ndarray) -> np.ndarray:
        """E[min(Q, Q_d)] in MW."""
        return self.expected_need()[..., None] - self.expected_unmet(q_mw)

    def quantile(self, probability: float) -> np.ndarray:
        """Quantile of Q_d (the normal's, or of the samples)."""
        mu = np.asarray(self.mu_mw, float)
        if self.samples is not None:
            z = np.quantile(self.samples, probability)
        else:
            z = ndtri(probability) if self.sigma_mw > 0 else 0.0
        return np.maximum(mu + self.sigma_mw * z - self.capacity_mw, 0.0)

    def _mc_tail(self, mu: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Monte Carlo E[(L - C - Q)+] from the sorted standardised samples (exact in the sample)."""
        z = np.sort(self.samples)
        tail_sum = np.concatenate([np.cumsum(z[::-1])[::-1], [0.0]])  # sum of z[i:]
        n = len(z)
        # L - C - Q > 0  <=>  z > (C + Q - mu) / sigma
        s = max(self.sigma_mw, 1e-300)
        threshold = (self.capacity_mw + q - mu) / s
        first = np.searchsorted(z, threshold, side="right")
        count = n - first
        excess = self.sigma_mw * tail_sum[first] + (mu - self.capacity_mw - q) * count
        return np.maximum(excess / n, 0.0)


def need_of(params: TenderParameters, mu_mw, rng: np.random.Generator | None = None) -> Need:
    """The need of Table I at mean load(s) ``mu_mw``: closed forms for the normal, else Monte
    Carlo (skew-normal for a skewness, Student t for a kurtosis above 3)."""
    samples = None
    if params.skewness != 0 or params.kurtosis != 3:
        rng = rng or np.random.default_rng(0)
        samples = standardised_samples(params, rng)
    return Need(mu_mw, params.sigma_mw, params.capacity_mw, samples)


def standardised_samples(params: TenderParameters, rng: np.random.Generator) -> np.ndarray:
    """``mc_samples`` draws of mean 0 and standard deviation 1 with the need's shape."""
    n = params.mc_samples
    if params.skewness != 0:
        # Skew-normal with the asked skewness (|skewness| < 0.995 is reachable).
        g = abs(params.skewness) ** (2 / 3)
        d = np.sign(params.skewness) * np.sqrt(np.pi / 2 * g / (g + ((4 - np.pi) / 2) ** (2 / 3)))
        u0, u1 = rng.standard_normal(n), rng.standard_normal(n)
        x = d * np.abs(u0) + np.sqrt(1 - d * d) * u1
        mean, var = d * np.sqrt(2 / np.pi), 1 - 2 * d * d / np.pi
        return (x - mean) / np.sqrt(var)
    if params.kurtosis > 3:
        dof = min(4 + 6 / (params.kurtosis - 3), 1e9)  # a kurtosis of 3 + 1e-300: the normal
        return rng.standard_t(dof, n) / np.sqrt(dof / (dof - 2))
    return rng.standard_normal(n)


# ----------------------------------------------------------------------------- offers


@dataclass(frozen=True)
class Offers:
    """Flexibility offers: node, quantity, availability and activation price (one row each)."""

    node: np.ndarray
    quantity_mw: np.ndarray
    p_av_eur_per_mw_year: np.ndarray
    p_act_eur_per_mwh: np.ndarray

    def __len__(self) -> int:
        return len(self.quantity_mw)

    def at(self, node: int) -> Offers:
        keep = self.node == node
        return Offers(*(a[keep] for a in dataclasses.astuple(self)))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(dataclasses.asdict(self)).rename_axis("offer")


def _truncated_normal(
    rng: np.random.Generator, cap: float, mean_ratio: float, std_ratio: float, n: int, how: str
) -> np.ndarray:
    """n prices N(mean_ratio cap, std_ratio cap) kept within [0, cap]: resampled, or clipped.

    Resampling is ``limits.truncated_normal``: at most 100 redraw rounds (the plain
    redraw loop's stream for the shipped sets, which end in a few), then
    scipy.stats' truncated normal, so a spread of any size ends.
    """
    mean, std = mean_ratio * cap, std_ratio * cap
    if how == "clip" or std == 0:
        return np.clip(rng.normal(mean, std, n), 0.0, cap)
    return truncated_normal(rng, mean, std, 0.0, cap, n)


def price_draws(params: TenderParameters, n: int, rng: np.random.Generator):
    """n independent (availability, activation) price pairs of Table I."""
    p = params
    av_cap, act_cap = p.p_av_cap_eur_per_mw_year, p.p_act_cap_eur_per_mwh
    av = _truncated_normal(rng, av_cap, p.p_av_mean_ratio, p.p_av_std_ratio, n, p.truncation)
    act = _truncated_normal(rng, act_cap, p.p_act_mean_ratio, p.p_act_std_ratio, n, p.truncation)
    return av, act


def generate_offers(params: TenderParameters, counts, rng: np.random.Generator) -> Offers:
    """Offers of nodes with ``counts[n]`` bids each (Table I).

    One sequence of price draws serves every node: node n takes its first counts[n]
    (the paper's "seed kept constant among nodes", so equal counts give identical
    offers). Bid size: the average size (volume follows the count) or, with
    ``node_volume = equal_volume``, the node's volume of 7.5 mu_mu split in its bids.
    """
    counts = np.asarray(counts, np.int64)
    av, act = price_draws(params, int(counts.max(initial=0)), rng)
    node = np.repeat(np.arange(len(counts)), counts)
    rank = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.zeros(0, int)
    rank = rank.astype(np.int64)
    if params.node_volume == "equal_bid_size":
        size = np.full(len(node), params.bid_size_ratio * params.mu_mu_mw)
    else:
        volume = params.offered_volume_ratio * params.mu_mu_mw
        size = volume / counts[node]
    return Offers(node, size, av[rank], act[rank])


# ----------------------------------------------------------------------------- clearing and cost


@dataclass(frozen=True)
class Curve:
    """Merit-order clearing of offers at every candidate quantity.

    ``order``: offers by availability price (ties: node, then position). Candidate
    j = 0 is Q = 0; candidate 1 + i * M + f (f = 0..M-1) lies at fraction (f+1)/M
    inside the i-th offer of the order, so candidate (i + 1) * M is its breakpoint.
    """

    order: np.ndarray
    q_mw: np.ndarray  # candidate quantities
    availability_eur_per_h: np.ndarray
    activation_price_eur_per_mwh: np.ndarray  # quantity-weighted mean of what is cleared
    points_per_offer: int

    @property
    def breakpoints_mw(self) -> np.ndarray:
        return self.q_mw[:: self.points_per_offer]


def merit_order(offers: Offers) -> np.ndarray:
    return np.lexsort((np.arange(len(offers)), offers.node, offers.p_av_eur_per_mw_year))


def clear_curve(offers: Offers, points_per_offer: int) -> Curve:
    """Pay-as-bid clearing by merit order of availability price, the marginal offer divisible."""
    order = merit_order(offers)
    q = offers.quantity_mw[order]
    av = offers.p_av_eur_per_mw_year[order] / HOURS_PER_YEAR
    act = offers.p_act_eur_per_mwh[order]
    m = points_per_offer
    frac = np.arange(1, m + 1) / m
    before_q = np.concatenate([[0.0], np.cumsum(q)[:-1]])
    before_av = np.concatenate([[0.0], np.cumsum(q * av)[:-1]])
    before_act = np.concatenate([[0.0], np.cumsum(q * act)[:-1]])
    part = q[:, None] * frac[None, :]  # MW taken inside each offer
    qq = np.concatenate([[0.0], (before_q[:, None] + part).ravel()])
    cost_av = np.concatenate([[0.0], (before_av[:, None] + part * av[:, None]).ravel()])
    spend_act = np.concatenate([[0.0], (before_act[:, None] + part * act[:, None]).ravel()])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_act = np.where(qq > 0, spend_act / qq, 0.0)
    return Curve(order, qq, cost_av, mean_act, m)


def expected_cost(params: TenderParameters, curve: Curve, need: Need) -> np.ndarray:
    """Eq. 1 at every candidate of ``curve`` (EUR/h); shape ``need.mu.shape + (candidates,)``."""
    availability, activation, unmet = cost_terms(params, curve, need)
    return availability + activation + unmet


def cost_terms(params: TenderParameters, curve: Curve, need: Need):
    """The three terms of Eq. 1 (EUR/h): availability, expected activation, expected unmet."""
    q = curve.q_mw
    activation = (
        params.utilisation * need.expected_activation(q) * curve.activation_price_eur_per_mwh
    )
    unmet = params.voll_weight * params.voll_eur_per_mwh * need.expected_unmet(q)
    availability = np.broadcast_to(curve.availability_eur_per_h, unmet.shape)
    return availability, activation, unmet


@dataclass(frozen=True)
class Optimum:
    q_mw: float
    cost_eur_per_h: float
    availability_eur_per_h: float
    activation_eur_per_h: float
    unmet_eur_per_h: float
    expected_unmet_mw: float


def optimal_quantity(params: TenderParameters, offers: Offers, need: Need) -> Optimum:
    """The Q that minimises Eq. 1 for one need (1-D search over the candidates)."""
    curve = clear_curve(offers, params.points_per_offer)
    return optimum_at(params, curve, need, int(np.argmin(expected_cost(params, curve, need))))


def optimum_at(params: TenderParameters, curve: Curve, need: Need, j: int) -> Optimum:
    av, act, un = (np.asarray(t)[..., j] for t in cost_terms(params, curve, need))
    return Optimum(
        q_mw=float(curve.q_mw[j]),
        cost_eur_per_h=float(av + act + un),
        availability_eur_per_h=float(av),
        activation_eur_per_h=float(act),
        unmet_eur_per_h=float(un),
        expected_unmet_mw=float(need.expected_unmet(curve.q_mw[j : j + 1])[..., 0]),
    )


def critical_fractile_mw(params: TenderParameters, p_av_eur_per_mw_year: float, p_act: float):
    """Newsvendor optimum for flat prices and a normal need: P(Q_d > Q*) = p_av / (w'VoLL - w p_act)
    per hour, i.e. Q* = mu - C + sigma Phi^-1(1 - ratio)."""
    ratio = (p_av_eur_per_mw_year / HOURS_PER_YEAR) / (
        params.voll_weight * params.voll_eur_per_mwh - params.utilisation * p_act
    )
    return params.mu_mu_mw - params.capacity_mw + params.sigma_mw * ndtri(1 - ratio)


def cost_curve_table(params: TenderParameters, offers: Offers, need: Need) -> pd.DataFrame:
    """Eq. 1 and its terms at every candidate quantity (for plots and inspection)."""
    curve = clear_curve(offers, params.points_per_offer)
    av, act, un = cost_terms(params, curve, need)
    return pd.DataFrame(
        {
            "q_mw": curve.q_mw,
            "availability_eur_per_h": av,
            "activation_eur_per_h": act,
            "unmet_eur_per_h": un,
            "cost_eur_per_h": av + act + un,
            "expected_unmet_mw": need.expected_unmet(curve.q_mw),
        }
    )


# ----------------------------------------------------------------------------- temporal aggregation


def aggregation_extra_cost(costs: np.ndarray) -> tuple[float, int]:
    """Eq. 2 for a (items x candidates) cost matrix: c_aggr in percent and the aggregated choice.

    c_hat - sum_t c_min^t = min_j sum_t (c_t,j - c_min^t): a minimum of sums of
    non-negative terms, so c_aggr >= 0 exactly, and 0 exactly for identical rows.
    """
    c_min = costs.min(axis=1)
    regret = (costs - c_min[:, None]).sum(axis=0)
    j = int(np.argmin(regret))
    return float(regret[j] / c_min.sum() * 100.0), j


def temporal_study(
    params: TenderParameters,
    sigma_mu_mw=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
    n_mtu=tuple(range(2, 21)),
    seeds=(0, 1, 2, 3, 4),
) -> pd.DataFrame:
    """Fig. 3: c_aggr against sigma_mu and the number of MTUs in one product.

    Per seed: one offer set of one node, serving every MTU; mean loads
    mu_t = mu_mu + sigma_mu z_t with the same z_t for every sigma_mu (common random
    numbers), the first n of them for n MTUs.
    """
    check_tender_request(params, "temporal", sigma_mu_mw=sigma_mu_mw, n_mtu=n_mtu, seeds=seeds)
    sigma_mu_mw, n_mtu = np.asarray(sigma_mu_mw, float), np.asarray(n_mtu, int)
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        offers = generate_offers(params, [params.bids_per_node], rng)
        curve = clear_curve(offers, params.points_per_offer)
        z = rng.standard_normal(int(n_mtu.max()))
        shape = need_of(params, params.mu_mu_mw, rng)  # Monte Carlo samples drawn once per seed
        for s in sigma_mu_mw:
            need = dataclasses.replace(shape, mu_mw=params.mu_mu_mw + s * z)
            costs = expected_cost(params, curve, need)
            _finite_costs(params, costs, f"temporal study (sigma_mu {s:g} MW)")
            for n in n_mtu:
                c_aggr, j = aggregation_extra_cost(costs[:n])
                rows.append(
                    {
                        "sigma_mu_mw": s,
                        "n_mtu": int(n),
                        "seed": seed,
                        "c_aggr_percent": c_aggr,
                        "q_aggregated_mw": float(curve.q_mw[j]),
                        "q_separate_mean_mw": float(curve.q_mw[costs[:n].argmin(axis=1)].mean()),
                        "cost_separate_eur_per_h": float(costs[:n].min(axis=1).sum()),
                        "cost_aggregated_eur_per_h": float(costs[:n, j].sum()),
                    }
                )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- spatial aggregation


def gini_index(counts) -> float:
    """Gini index of non-negative counts: sum_ij |x_i - x_j| / (2 n^2 mean)."""
    x = np.asarray(counts, float)
    if len(x) == 0 or x.sum() == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


def max_gini(n_nodes: int) -> float:
    """The largest Gini index of counts over n nodes: every offer at one node, (n - 1) / n."""
    return (n_nodes - 1) / n_nodes


def offer_counts(n_nodes: int, total: int, gini: float) -> np.ndarray:
    """Offers per node whose Gini index is as close to ``gini`` as integer counts allow.

    Shares follow the one-parameter Lorenz curve L(p) = p^a (Gini (a - 1) / (a + 1)
    before rounding); counts are rounded by largest remainder to sum to ``total``
    and a is calibrated by bisection on the Gini of the rounded counts. Returns
    counts in ascending order. Beyond ``max_gini(n_nodes)`` the index is out of
    reach: an InputError says so.
    """
    if not 0 <= gini < 1:
        raise InputError(f"'gini' must be in [0, 1), got {gini}")
    if gini > max_gini(n_nodes) + 1e-12:
        raise InputError(
            f"a Gini index of {gini} is out of reach with {n_nodes} nodes "
            f"(at most {max_gini(n_nodes):.3f}, every offer at one node)"
        )

    def counts_at(a: float) -> np.ndarray:
        p = np.arange(n_nodes + 1) / n_nodes
        share = np.diff(p**a) * total
        base = np.floor(share).astype(np.int64)
        rest = total - base.sum()
        extra = np.argsort(-(share - base), kind="stable")[:rest]
        base[extra] += 1
        return np.sort(base)

    lo, hi = 1.0, 1.0
    while gini_index(counts_at(hi)) < gini and hi < 1e6:
        hi *= 2
    best = counts_at(lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        c = counts_at(mid)
        if abs(gini_index(c) - gini) < abs(gini_index(best) - gini):
            best = c
        lo, hi = (mid, hi) if gini_index(c) < gini else (lo, mid)
    return (
        best
        if abs(gini_index(counts_at(hi)) - gini) >= abs(gini_index(best) - gini)
        else (counts_at(hi))
    )


@dataclass(frozen=True)
class SpatialCase:
    """One draw of the spatial study: separate nodal tenders against one pooled tender."""

    gini_achieved: float
    counts: np.ndarray
    c_aggr_percent: float
    q_pooled_mw: float
    q_separate_mw: np.ndarray  # per node
    q_cleared_mw: np.ndarray  # per node, in the pooled tender
    cost_separate_eur_per_h: float
    cost_pooled_eur_per_h: float
    nodes_below_median: int  # nodes whose cleared volume misses the median of their need
    median_need_mw: np.ndarray  # per node


def spatial_case(params: TenderParameters, counts, rng: np.random.Generator) -> SpatialCase:
    """Table I offers at nodes with ``counts`` bids each and the Table I need at every node:
    separate tenders per node against one pooled tender (``pooled_tender``)."""
    counts = np.asarray(counts, np.int64)
    offers = generate_offers(params, counts, rng)
    need = need_of(params, params.mu_mu_mw, rng)
    return pooled_tender(params, offers, [need] * len(counts), rng)


def pooled_tender(
    params: TenderParameters,
    offers: Offers,
    needs: list[Need],
    rng: np.random.Generator,
    correlated: bool = False,
) -> SpatialCase:
    """Separate tenders per node against one merit order over the pooled offers.

    Node n has the offers with ``offers.node == n`` and the need ``needs[n]``. Each
    node keeps the volume cleared at it in the pooled tender; its activation and
    unmet need are evaluated there (true nodal costs). The pooled Q follows the
    sizing rule: A, the Q that minimises the sum of true nodal costs; B, the Q that
    minimises Eq. 1 for the pooled need (sum of the nodal needs, Monte Carlo, the
    nodes' loads independent or, with ``correlated``, moving together) on the pooled
    offers, with no nodal steering.
    """
    n_nodes = len(needs)
    counts = np.bincount(offers.node, minlength=n_nodes)
    m = params.points_per_offer
    # Every node's own curve; the pooled merit order visits each node's offers in its own order.
    node_costs, offsets = [], [0]
    for n in range(n_nodes):
        c = expected_cost(params, clear_curve(offers.at(n), m), needs[n])
        node_costs.append(np.asarray(c).ravel())
        offsets.append(offsets[-1] + len(node_costs[-1]))
    flat = np.concatenate(node_costs)
    _finite_costs(params, flat, f"tender at {n_nodes} nodes")
    offsets = np.asarray(offsets)
    c_min = np.array([c.min() for c in node_costs])
    best = np.array([int(c.argmin()) for c in node_costs])
    pooled = clear_curve(offers, m)
    # Position of every offer in its own node's merit order (a prefix of the pooled one).
    own_rank = np.empty(len(offers), np.int64)
    for n in range(n_nodes):
        at_n = np.flatnonzero(offers.node == n)
        own_rank[at_n[merit_order(offers.at(n))]] = np.arange(len(at_n))
    node_of = offers.node[pooled.order]
    rank_of = own_rank[pooled.order]
    # Regret of every node (cost above its separate optimum) at every pooled candidate: the
    # other nodes sit at the offers they completed before this one, the node of this offer
    # inside it. A sum of exact non-negative terms, so c_aggr >= 0 holds exactly.
    regret_flat = flat - np.repeat(c_min, np.diff(offsets))
    taken = np.zeros((len(node_of), n_nodes), np.int64)
    taken[np.arange(len(node_of)), node_of] = 1
    completed = np.cumsum(taken, axis=0) - taken  # offers of each node before pooled offer j
    at_node = regret_flat[offsets[:-1][None, :] + completed * m]
    at_node[np.arange(len(node_of)), node_of] = 0.0
    others = at_node.sum(axis=1)
    inside = (offsets[node_of] + rank_of * m)[:, None] + np.arange(1, m + 1)[None, :]
    regret = np.concatenate(
        [[regret_flat[offsets[:-1]].sum()], (others[:, None] + regret_flat[inside]).ravel()]
    )
    if params.sizing_rule == "A":
        j = int(np.argmin(regret))
    else:
        shape = (params.mc_samples, 1 if correlated else n_nodes)
        z = np.broadcast_to(rng.standard_normal(shape), (params.mc_samples, n_nodes))
        pooled_need = np.zeros(params.mc_samples)
        for n, need in enumerate(needs):
            # A non-normal need: its own quantiles at the normal draws (a Gaussian copula).
            draws = z[:, n] if need.samples is None else np.quantile(need.samples, ndtr(z[:, n]))
            pooled_need += np.maximum(
                np.asarray(need.mu_mw) + need.sigma_mw * draws - need.capacity_mw, 0.0
            )
        mean, std = pooled_need.mean(), pooled_need.std()
        as_need = Need(mean, std, 0.0, (pooled_need - mean) / max(std, 1e-12))
        j = int(np.argmin(expected_cost(params, pooled, as_need)))
    # Volume cleared at each node at candidate j.
    cleared = np.zeros(n_nodes)
    if j > 0:
        i, f = divmod(j - 1, m)
        taken = offers.quantity_mw[pooled.order]
        np.add.at(cleared, node_of[:i], taken[:i])
        cleared[node_of[i]] += taken[i] * (f + 1) / m
    median = np.array([float(need.quantile(0.5)) for need in needs])
    separate_q = np.array([clear_curve(offers.at(n), m).q_mw[best[n]] for n in range(n_nodes)])
    return SpatialCase(
        gini_achieved=gini_index(counts),
        counts=counts,
        c_aggr_percent=float(regret[j] / c_min.sum() * 100.0),
        q_pooled_mw=float(pooled.q_mw[j]),
        q_separate_mw=separate_q,
        q_cleared_mw=cleared,
        cost_separate_eur_per_h=float(c_min.sum()),
        cost_pooled_eur_per_h=float(c_min.sum() + regret[j]),
        nodes_below_median=int((cleared < median - 1e-9).sum()),
        median_need_mw=median,
    )


SPATIAL_GINI = tuple(round(0.05 * i, 2) for i in range(15))  # 0 .. 0.7


def spatial_study(
    params: TenderParameters,
    gini=SPATIAL_GINI,
    n_nodes=tuple(range(2, 21)),
    seeds=(0, 1, 2, 3, 4),
) -> pd.DataFrame:
    """Fig. 5: c_aggr against the Gini index of the offer counts and the number of nodes.

    Every node's need is that of Table I (sigma_mu = 0); the total number of offers
    is n_nodes x the per-node average. A Gini index out of reach for n nodes
    (above (n - 1) / n) gives a row with NaN results and ``reachable`` False.
    """
    check_tender_request(params, "spatial", gini=gini, n_nodes=n_nodes, seeds=seeds)
    rows = []
    for n in n_nodes:
        for g in gini:
            reachable = g <= max_gini(n) + 1e-12
            counts = offer_counts(n, n * params.bids_per_node, g) if reachable else None
            for seed in seeds:
                row = {"gini": float(g), "n_nodes": int(n), "seed": seed, "reachable": reachable}
                if reachable:
                    case = spatial_case(params, counts, np.random.default_rng(seed))
                    row |= {
                        "gini_achieved": case.gini_achieved,
                        "c_aggr_percent": case.c_aggr_percent,
                        "q_pooled_mw": case.q_pooled_mw,
                        "q_separate_sum_mw": float(case.q_separate_mw.sum()),
                        "cost_separate_eur_per_h": case.cost_separate_eur_per_h,
                        "cost_pooled_eur_per_h": case.cost_pooled_eur_per_h,
                        "nodes_below_median": case.nodes_below_median,
                        "any_node_below_median": case.nodes_below_median > 0,
                        "nodes_without_offers": int((case.counts == 0).sum()),
                    }
                rows.append(row)
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean over seeds (and the probability of under-procurement where the study has it)."""
    agg = {
        "c_aggr_percent": ("c_aggr_percent", "mean"),
        "c_aggr_std_percent": ("c_aggr_percent", "std"),
    }
    if "any_node_below_median" in table:
        agg["p_node_below_median"] = ("any_node_below_median", "mean")
        agg["gini_achieved"] = ("gini_achieved", "mean")
    numeric = table.assign(
        **{c: table[c].astype(float) for c in ("any_node_below_median",) if c in table}
    )
    return numeric.groupby(by, sort=True).agg(**agg).reset_index()


# ----------------------------------------------------------------------------- deterministic rule


def deterministic_comparison(
    params: TenderParameters, seeds=(0, 1, 2, 3, 4), peak_quantiles=(0.5, 0.9, 0.99)
) -> pd.DataFrame:
    """MiNDFlex's rule (procure peak load minus threshold) beside the probabilistic optimum.

    The deterministic quantity is max(L_peak - C, 0) with L_peak a quantile of the
    load forecast (0.5: the forecast itself; 0.9 and 0.99: a prudent historic
    peak). Both are cleared on the same offers and costed by Eq. 1 on the same need.
    """
    check_tender_request(params, "optimum", seeds=seeds)
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        offers = generate_offers(params, [params.bids_per_node], rng)
        need = need_of(params, params.mu_mu_mw, rng)
        curve = clear_curve(offers, params.points_per_offer)
        costs = np.asarray(expected_cost(params, curve, need)).ravel()
        _finite_costs(params, costs, "optimum")
        rules = [("probabilistic optimum", curve, int(np.argmin(costs)))]
        for p in peak_quantiles:
            at = curve_at(curve, float(need.quantile(p)))
            rules.append((f"peak minus threshold (P{p * 100:g})", at, 0))
        for rule, c, j in rules:
            o = optimum_at(params, c, need, j)
            rows.append(
                {
                    "seed": seed,
                    "rule": rule,
                    **dataclasses.asdict(o),
                    "extra_cost_percent": (o.cost_eur_per_h / costs.min() - 1) * 100,
                }
            )
    return pd.DataFrame(rows)


def curve_at(curve: Curve, q_mw) -> Curve:
    """The clearing at arbitrary quantities (availability cost and activation spend are
    piecewise linear in Q, so interpolating between candidates is exact)."""
    q = np.clip(np.atleast_1d(np.asarray(q_mw, float)), 0.0, curve.q_mw[-1])
    spend = np.interp(q, curve.q_mw, curve.activation_price_eur_per_mwh * curve.q_mw)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_act = np.where(q > 0, spend / q, 0.0)
    return Curve(
        curve.order, q, np.interp(q, curve.q_mw, curve.availability_eur_per_h), mean_act, 1
    )


# ----------------------------------------------------------------------------- outputs

TENDER_STUDIES = ("optimum", "temporal", "spatial", "all")


def run_tender_studies(
    params: TenderParameters,
    study: str,
    folder: Path,
    *,
    sigma_mu_mw=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
    n_mtu=tuple(range(2, 21)),
    gini=SPATIAL_GINI,
    n_nodes=tuple(range(2, 21)),
    seeds=(0, 1, 2, 3, 4),
    label: str = "",
) -> dict[str, pd.DataFrame]:
    """Run ``study`` (optimum | temporal | spatial | all) and write its tables and figures."""
    from lfm_zonal.files.outputs import write_csv, write_json
    from lfm_zonal.report.plots import (
        plot_tender_cost_curve,
        plot_tender_spatial,
        plot_tender_temporal,
    )

    if study not in TENDER_STUDIES:
        raise InputError(
            f"unknown tender study '{study}': choose one of {', '.join(TENDER_STUDIES)}"
        )
    check_tender_request(
        params,
        study,
        sigma_mu_mw=sigma_mu_mw,
        n_mtu=n_mtu,
        gini=gini,
        n_nodes=n_nodes,
        seeds=seeds,
    )
    tag = f" ({label})" if label else ""
    out: dict[str, pd.DataFrame] = {}
    write_json(dataclasses.asdict(params) | {"seeds": list(seeds)}, folder / "parameters.json")
    if study in ("optimum", "all"):
        rng = np.random.default_rng(seeds[0])
        offers = generate_offers(params, [params.bids_per_node], rng)
        need = need_of(params, params.mu_mu_mw, rng)
        curve = cost_curve_table(params, offers, need)
        rules = deterministic_comparison(params, seeds)
        write_csv(offers.table(), folder / "offers_seed0.csv")
        write_csv(curve, folder / "cost_curve.csv", index=False)
        write_csv(rules, folder / "deterministic_vs_probabilistic.csv", index=False)
        plot_tender_cost_curve(
            curve,
            rules[rules.seed == seeds[0]],
            folder / "cost_curve.png",
            f"Expected cost of one tender against the procured quantity{tag}, seed {seeds[0]}",
        )
        out |= {"cost_curve": curve, "deterministic": rules}

    def write_study(name: str, table: pd.DataFrame, summary: pd.DataFrame, plot, title: str):
        write_csv(table, folder / f"{name}.csv", index=False)
        write_csv(summary, folder / f"{name}_summary.csv", index=False)
        plot(summary, folder / f"{name}.png", f"{title}: mean of {len(seeds)} seeds")
        out.update({name: table, f"{name}_summary": summary})

    if study in ("temporal", "all"):
        table = temporal_study(params, sigma_mu_mw, n_mtu, seeds)
        summary = summarise(table, ["sigma_mu_mw", "n_mtu"])
        write_study("temporal", table, summary, plot_tender_temporal, f"Temporal aggregation{tag}")
    if study in ("spatial", "all"):
        if not any(g <= max_gini(n) + 1e-12 for g in gini for n in n_nodes):
            raise InputError(
                f"--gini {', '.join(f'{g:g}' for g in gini)} with --n-nodes "
                f"{', '.join(str(n) for n in n_nodes)}: every cell is out of reach (a Gini "
                f"index of N nodes is at most (N - 1) / N, {max_gini(max(n_nodes)):.3g} here)"
            )
        table = spatial_study(params, gini, n_nodes, seeds)
        summary = summarise(table[table.reachable], ["gini", "n_nodes"])
        title = f"Spatial aggregation{tag}, sizing rule {params.sizing_rule}"
        write_study("spatial", table, summary, plot_tender_spatial, title)
    return out
