"""What a request may ask of the machine, and samplers whose loops are bounded.

``require_memory`` estimates the memory of a request from its dimensions and
refuses it with one ``InputError`` line, before anything is allocated, when the
estimate is above the budget: ``MEMORY_SHARE`` of the memory available now
(cgroup limit, /proc/meminfo MemAvailable or ``os.sysconf``, the smallest), or
the ``LFM_ZONAL_MAX_MEMORY_GIB`` environment variable where set.

``release_free_memory`` returns the C heap's free pages to the system between the
stages of a long study.

``truncated_normal`` draws a normal kept within bounds: a bounded number of
redraw rounds (the stream of the plain redraw loop wherever it finishes in them),
then scipy.stats' truncated normal for what is left, so no bound and no spread
can make it loop forever.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from lfm_zonal.errors import InputError

GIB = 2.0**30
MEMORY_SHARE = 0.75  # of the available memory a single request may take
MEMORY_ENV = "LFM_ZONAL_MAX_MEMORY_GIB"
REDRAW_ROUNDS = 100  # redraw rounds before the rest is drawn from scipy's truncated normal
MIN_ACCEPTANCE = 0.01  # below this share inside the window, no redraw round at all

Term = Sequence[tuple[float, str]]  # factors of one array family: (count, label), ...


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere), as Dask's workers do. Called between the markets of a study: each market
    frees hundreds of MB of sparse factors and LP arrays in small blocks that glibc keeps
    mapped, so the resident memory of a long study would otherwise only grow (SimBench
    MV+LV, 96 MTUs, nine markets: peak RSS 4.68 GB without, 3.25 GB with)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


#: Where the cgroup hierarchies are mounted. v2: one hierarchy, a CPU quota in ``cpu.max``
#: ("max" or "quota period"), memory in ``memory.max`` and ``memory.current``; v1: one per
#: controller, ``cpu/cpu.cfs_quota_us`` (-1 for none) and ``cpu/cpu.cfs_period_us``,
#: ``memory/memory.limit_in_bytes`` and ``memory/memory.usage_in_bytes``.
CGROUP_ROOT = "/sys/fs/cgroup"
#: This process's cgroups, one line per hierarchy: "0::/path" (v2), "N:cpu,cpuacct:/path"
#: (v1).
PROC_CGROUP = "/proc/self/cgroup"


def _read_words(path: str) -> list[str] | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().split()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_dirs(controller: str, root: str | None = None, own: str | None = None) -> list[str]:
    """The folders holding this process's cgroup files for ``controller`` (``cpu``,
    ``memory``): v2's, then v1's, each from the process's own cgroup up to the root of
    its hierarchy, those that exist. A limit can sit at any of them: a batch job's or a
    systemd unit's in its own cgroup, a container's at the root it sees (a container with
    its own cgroup namespace reads "/" as its path). ``root``: CGROUP_ROOT by default;
    ``own``: the text of PROC_CGROUP (read by default)."""
    root = CGROUP_ROOT if root is None else root
    if own is None:
        try:
            with open(PROC_CGROUP, encoding="ascii") as f:
                own = f.read()
        except (OSError, UnicodeDecodeError):
            own = ""
    paths = {"v2": "/", "v1": "/"}
    for line in own.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            paths["v2"] = parts[2]
        elif len(parts) == 3 and controller in parts[1].split(","):
            paths["v1"] = parts[2]
    dirs = []
    for mount, path in ((root, paths["v2"]), (os.path.join(root, controller), paths["v1"])):
        parts = [p for p in path.split("/") if p and p not in (".", "..")]
        for depth in range(len(parts), -1, -1):
            folder = os.path.join(mount, *parts[:depth])
            if os.path.isdir(folder):
                dirs.append(folder)
    return dirs


def cgroup_cpu_quota(root: str | None = None, own: str | None = None) -> float | None:
    """The CPU time this process's cgroups allow, in cores: the smallest quota along
    ``cgroup_dirs("cpu", root, own)`` (None: no quota, or no cgroup files)."""
    quotas = []
    for folder in cgroup_dirs("cpu", root, own):
        v2 = _read_words(os.path.join(folder, "cpu.max"))
        if v2 is not None:
            quota, period = (v2 + ["100000"])[:2]
        else:
            quota = (_read_words(os.path.join(folder, "cpu.cfs_quota_us")) or ["-1"])[0]
            period = (_read_words(os.path.join(folder, "cpu.cfs_period_us")) or ["100000"])[0]
        try:
            quota_us, period_us = float(quota), float(period)
        except ValueError:  # "max": no quota
            continue
        if quota_us > 0 and period_us > 0:  # v1's -1: no quota
            quotas.append(quota_us / period_us)
    return min(quotas, default=None)


def cgroup_memory_room(root: str | None = None, own: str | None = None) -> float | None:
    """Bytes this process's cgroups still allow: the smallest limit minus usage along
    ``cgroup_dirs("memory", root, own)`` (None: no limit, or no cgroup files)."""
    rooms = []
    for folder in cgroup_dirs("memory", root, own):
        for limit_file, usage_file in (
            ("memory.max", "memory.current"),
            ("memory.limit_in_bytes", "memory.usage_in_bytes"),
        ):
            limit = _read_words(os.path.join(folder, limit_file))
            usage = _read_words(os.path.join(folder, usage_file))
            if not limit or not usage:
                continue
            try:
                limit_b, usage_b = float(limit[0]), float(usage[0])
            except ValueError:  # "max": no limit
                continue
            if limit_b < 2.0**60:  # v1 writes "no limit" as a page-rounded 2**63
                rooms.append(max(limit_b - usage_b, 0.0))
    return min(rooms, default=None)


def available_cores() -> int:
    """Cores this process may use: its CPU affinity (all of the machine's elsewhere), at most
    its cgroups' CPU quota rounded up where one is set (a container started with
    ``--cpus 2`` on a 64-core host sees 64 cores but gets the time of 2: one market
    worker per visible core would hold 64 markets' memory for no speed)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def available_memory_bytes() -> float:
    """Memory this process may still take: the smallest of the cgroup's room, MemAvailable
    and the free physical pages (whichever the system reports)."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(float(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    room = cgroup_memory_room()
    if room is not None:
        found.append(room)
    if not found:
        try:
            found.append(float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")))
        except (OSError, ValueError, AttributeError):
            return math.inf
    return min(found)


#: Processes of one command that may each hold a request at once (``share_memory``).
_sharing = 1


def share_memory(processes: int) -> None:
    """Called in each of a command's ``processes`` worker processes (``study.workers``):
    a request there gets its share of the budget, since the others may hold theirs at the
    same time (each alone would see the whole machine's memory as available)."""
    global _sharing
    _sharing = max(1, int(processes))


def memory_budget_bytes() -> tuple[float, float]:
    """(budget, available) in bytes for one request: the override of LFM_ZONAL_MAX_MEMORY_GIB,
    else MEMORY_SHARE of what is available; in a command's worker processes, their share
    of it (``share_memory``)."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        try:
            gib = float(text)
        except ValueError:
            gib = math.nan
        if not (gib > 0 and math.isfinite(gib)):
            raise InputError(f"{MEMORY_ENV}={text!r}: give a positive number of GiB")
        return gib * GIB / _sharing, gib * GIB / _sharing
    available = available_memory_bytes() / _sharing
    return MEMORY_SHARE * available, available


def _product(term: Term) -> float:
    size = 1.0
    for count, _ in term:
        size *= float(count)
    return size


def _count(value: float) -> str:
    v = float(value)
    return f"{v:.0f}" if v.is_integer() and abs(v) < 1e15 else f"{v:.3g}"


def require_memory(
    what: str,
    terms: Iterable[Term],
    *,
    bytes_per_item: int = 8,
    hint: str = "",
) -> float:
    """Refuse (InputError) a request whose arrays would not fit in memory; else its estimate.

    ``terms``: one entry per family of arrays, each a sequence of (count, label)
    factors whose product is a number of items of ``bytes_per_item`` (float64 by
    default), e.g. ``[[(T, "MTUs"), (branches, "branches"), (areas, "areas"),
    (4, "arrays")]]``. The estimate is the sum over the terms; the message names
    the factors of the terms that matter (a tenth of the largest or more). Counts
    that are not finite are refused as well. Call it before allocating.
    """
    terms = [list(t) for t in terms]
    sizes = [_product(t) for t in terms]
    needed = sum(sizes) * bytes_per_item
    budget, available = memory_budget_bytes()
    if math.isfinite(needed) and needed <= budget:
        return needed
    largest = max(sizes, default=0.0)
    shown = [
        " x ".join(f"{_count(c)} {label}".rstrip() for c, label in t)
        for t, s in zip(terms, sizes, strict=True)
        if not math.isfinite(s) or s >= 0.1 * largest
    ]
    dims = " + ".join(shown) + f" x {bytes_per_item} bytes"
    amount = f"about {needed / GIB:.3g} GiB" if math.isfinite(needed) else "unbounded memory"
    where = (
        f"the budget is {budget / GIB:.3g} GiB ({MEMORY_ENV})"
        if os.environ.get(MEMORY_ENV, "").strip()
        else f"the machine has {available / GIB:.3g} GiB available"
    )
    if _sharing > 1:
        where += f" for each of {_sharing} worker processes (--workers 1: all of it for one)"
    raise InputError(
        f"{what}: this request needs {amount} ({dims}); {where}" + (f"; {hint}" if hint else "")
    )


def truncated_normal(
    rng: np.random.Generator,
    mean: float,
    std: float,
    low: float,
    high: float,
    n: int,
    rounds: int = REDRAW_ROUNDS,
) -> np.ndarray:
    """n draws of N(mean, std) conditioned on [low, high] (either bound may be infinite).

    Up to ``rounds`` rounds redraw what fell outside (the plain redraw loop's
    stream wherever it ends in them); what is still outside is then drawn from
    scipy.stats.truncnorm (no round at all when less than MIN_ACCEPTANCE of the
    normal lies in the window; uniform draws when the window is under 1e-6
    deviations wide, where the density is flat). Every value is truncated-normal
    either way and the work is at most ``rounds`` x n draws whatever the spread.
    ``std`` 0 gives the mean clipped to the window, an infinite one (finite window)
    the uniform.
    """
    if not (low <= high):
        raise InputError(f"truncated normal: empty window [{low}, {high}]")
    if not (math.isfinite(mean) and std >= 0) or (
        math.isinf(std) and not (math.isfinite(low) and math.isfinite(high))
    ):
        raise InputError(
            f"truncated normal: mean {mean} must be finite and deviation {std} >= 0 "
            "(finite where the window is not)"
        )
    if std == 0 or n == 0:
        return np.clip(np.full(n, float(mean)), low, high)
    a, b = (low - mean) / std, (high - mean) / std
    accept = 0.5 * (math.erf(b / math.sqrt(2)) - math.erf(a / math.sqrt(2)))
    if accept < MIN_ACCEPTANCE:
        rounds = 0  # redrawing would mostly miss: straight to the truncated normal
    x = rng.normal(mean, std, n) if rounds else np.full(n, math.nan)
    out = ~((x >= low) & (x <= high))
    for _ in range(rounds):
        if not out.any():
            return x
        x[out] = rng.normal(mean, std, int(out.sum()))
        out = (x < low) | (x > high)
    left = int(out.sum())
    if left and b - a < 1e-6:
        # A window far narrower than the spread: the density is flat on it to 1e-12.
        x[out] = rng.uniform(low, high, left)
    elif left:
        from scipy.stats import truncnorm

        x[out] = truncnorm.rvs(a, b, loc=mean, scale=std, size=left, random_state=rng)
        np.clip(x, low, high, out=x)  # the quantile function's last ulp
    return x
