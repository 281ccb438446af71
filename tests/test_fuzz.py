"""A fuzz suite of bad inputs: every one must be refused cleanly.

A seeded generator builds bad or odd inputs of every class users have tripped on
(scenario keys and values, resources CSV, profiles CSV, grid JSON, command-line
arguments, tender parameters, undecodable files). Each case runs through the
command-line entry point (``lfm_zonal.cli.main``, in-process) in a scratch folder
holding its input files, and must give

* exit code 2 and exactly one line on stderr, ``lfm-zonal: error: ...``, naming the
  key, the row or column, or the element (``expect``),
* no traceback, no hang (an alarm stops a case after ``CASE_TIMEOUT_S``),
* its input files unchanged, and no output folder.

The cases are data (``CASES``), generated once at import from a fixed seed, so a
failing case is named by its id and reproduces alone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from lfm_zonal.cli import main

CASE_TIMEOUT_S = 60
SEED = 20261125


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One bad input: files to write, the command line, what the error must name."""

    kind: str
    name: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # every one of these (case-insensitive) is in the error line
    files: dict = field(default_factory=dict)  # name -> str or bytes

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


def three_bus_json() -> str:
    """Slack - line 0 - bus 1 - line 1 (150 A) - bus 2 with a 6 MW load: a small valid grid."""
    import pandapower as pp

    net = pp.create_empty_network()
    b = [pp.create_bus(net, 20.0) for _ in range(3)]
    pp.create_ext_grid(net, b[0], vm_pu=1.0)
    for f, t, imax in ((0, 1, 1.0), (1, 2, 0.15)):
        pp.create_line_from_parameters(
            net, b[f], b[t], 2.0, r_ohm_per_km=0.2, x_ohm_per_km=0.12, c_nf_per_km=0.0,
            max_i_ka=imax,
        )  # fmt: skip
    pp.create_load(net, b[2], p_mw=6.0, q_mvar=1.0)
    pp.create_load(net, b[1], p_mw=1.0, q_mvar=0.2)
    pp.create_sgen(net, b[1], p_mw=0.5)
    return pp.to_json(net)


SCENARIO = """name = "fuzz"
seed = 1

[grid]
source = "grid.json"
vm_min_pu = 0.9
vm_max_pu = 1.1
loading_max_percent = 100

[horizon]
start = "2016-01-14 17:00"
n_mtu = 2
mtu_minutes = 60

[zones]
k = [1, 2]

[market]
methods = ["nodal", "zonal"]
"""

RESOURCES_HEADER = (
    "resource_id,aggregator,bus,kind,direction,p_max_mw,cost_up_eur_per_mwh,"
    "cost_down_eur_per_mwh,tan_phi,energy_mwh,soc_init_mwh,efficiency"
)
RESOURCES_ROWS = [
    "A,agg1,2,load,up,2,50,0,0,,,",
    "B,agg2,1,sgen,down,0.3,0,20,0,,,",
    "S,agg1,2,storage,both,1,30,30,0,2,1,0.95",
]


def scenario_text(section: str | None, key: str, value: str) -> str:
    """The base scenario with ``key = value`` set in ``section`` (added if absent)."""
    lines = SCENARIO.splitlines()
    if section is None:
        lines = [line for line in lines if not line.startswith(f"{key} =")]
        return f"{key} = {value}\n" + "\n".join(lines) + "\n"
    out, in_section, done = [], False, False
    for line in lines:
        if line.startswith("["):
            if in_section and not done:
                out.append(f"{key} = {value}")
                done = True
            in_section = line == f"[{section}]"
        elif in_section and line.startswith(f"{key} ="):
            out.append(f"{key} = {value}")
            done = True
            continue
        out.append(line)
    if in_section and not done:
        out.append(f"{key} = {value}")
        done = True
    if not done:
        out += ["", f"[{section}]", f"{key} = {value}"]
    return "\n".join(out) + "\n"


NUMBER_BAD = ["inf", "-inf", "nan", '"abc"', "[1, 2]", "true"]
COUNT_BAD = ["0", "-3", "1.5", '"four"', "1e12", "inf"]

SCENARIO_KEYS: dict[tuple[str | None, str], list[str]] = {
    (None, "seed"): ['"x"', "1.5", "-1", "[1]"],
    (None, "name"): ["3", "[1]"],
    ("grid", "vm_min_pu"): [*NUMBER_BAD, "-0.5", "0", "1.2", "5"],
    ("grid", "vm_max_pu"): [*NUMBER_BAD, "0.85", "0", "-1", "1e9"],
    ("grid", "loading_max_percent"): [*NUMBER_BAD, "0", "-50"],
    ("grid", "source"): ['"no_such_grid"', '"missing.json"', "3", '""'],
    ("horizon", "start"): ['""', '"not a date"', '"1500-01-01"', '"2300-01-01 00:00"', "3"],
    ("horizon", "n_mtu"): COUNT_BAD,
    ("horizon", "mtu_minutes"): [*COUNT_BAD, "100000000"],
    ("profiles", "load_scale"): [*NUMBER_BAD, "-1", "1e300"],
    ("profiles", "sgen_scale"): [*NUMBER_BAD, "-2", "1e300"],
    ("profiles", "csv"): ['"missing.csv"', "3"],
    ("sensitivity", "method"): ['"newton"', "1", '""'],
    ("zones", "k"): ["[0]", "[-1]", "[1.5]", "[]", '["a"]', "[100000]", "3", "[1, inf]"],
    ("zones", "method"): ['"kmeans"', "2"],
    ("zones", "weights"): ['"random"', "0"],
    ("zones", "reference_mtu"): ['"noon"', "-1", "99999", "1.5"],
    ("flexibility", "load_up_share"): [*NUMBER_BAD, "-0.1", "1.5"],
    ("flexibility", "load_down_share"): [*NUMBER_BAD, "-0.1", "2"],
    ("flexibility", "sgen_down_share"): [*NUMBER_BAD, "-1", "3"],
    ("flexibility", "units_per_element"): COUNT_BAD,
    ("flexibility", "n_aggregators"): COUNT_BAD,
    ("flexibility", "storage_units"): ["-1", "1.5", '"two"', "1e12", "inf"],
    ("flexibility", "storage_p_mw"): [*NUMBER_BAD, "-1"],
    ("flexibility", "storage_hours"): [*NUMBER_BAD, "-1"],
    ("flexibility", "storage_efficiency"): [*NUMBER_BAD, "0", "1.5", "-0.2"],
    ("flexibility", "cost_load_up"): ["[inf, 0]", "[nan, 1]", "[1]", "[1, 2, 3]", "5", '"cheap"'],
    ("flexibility", "cost_load_down"): ["[1, -5]", "[1e300, 1]", "[]"],
    ("flexibility", "cost_sgen_down"): ["[-inf, 1]", "[1, nan]", '["a", 1]'],
    ("flexibility", "cost_storage"): ["[0, inf]", "[1e301, 0]"],
    ("flexibility", "max_steps"): COUNT_BAD,
    ("flexibility", "csv"): ['"missing_resources.csv"', "7"],
    ("market", "methods"): ["[]", '["auction"]', '"nodal"', "[1]"],
    ("market", "pricing"): ['"free"', "1"],
    ("market", "penalty_eur_per_mwh"): [*NUMBER_BAD, "0", "-10"],
    ("market", "needs"): ['"infinite"', "2"],
}


#: Where the error names the value rather than the key.
EXPECT_VALUE = {
    ("grid", "source", '"no_such_grid"'): ("no_such_grid",),
    ("grid", "source", '"missing.json"'): ("missing.json",),
    ("profiles", "csv", '"missing.csv"'): ("missing.csv",),
    ("flexibility", "csv", '"missing_resources.csv"'): ("missing_resources.csv",),
}

#: Values of a TOML type no key takes (an inline table, a date-time).
WRONG_TYPE = ["{ a = 1 }", "1979-05-27T07:32:00Z"]


def scenario_cases() -> list[Case]:
    cases = []
    for (section, key), values in SCENARIO_KEYS.items():
        for value in [*values, *WRONG_TYPE]:
            text = scenario_text(section, key, value)
            cases.append(
                Case(
                    "scenario",
                    f"{section or 'top'}.{key}={value}",
                    ("run", "scenario.toml", "--out", "out"),
                    EXPECT_VALUE.get((section, key, value), (key,)),
                    {"scenario.toml": text, "grid.json": GRID},
                )
            )
    # Unknown keys and sections, broken TOML, cross-field rules.
    extra = [
        ("unknown key", scenario_text("grid", "vm_mid_pu", "1.0"), ("vm_mid_pu",)),
        ("unknown section", SCENARIO + "\n[auction]\nrounds = 3\n", ("auction",)),
        ("top-level typo", "seeds = 3\n" + SCENARIO, ("seeds",)),
        ("missing grid source", SCENARIO.replace('source = "grid.json"\n', ""), ("source",)),
        ("broken toml", SCENARIO.replace("[grid]", "[grid"), ("scenario.toml",)),
        ("duplicate key", scenario_text("grid", "vm_min_pu", "0.9") + "", ()),
        (
            "vm_min above vm_max",
            scenario_text("grid", "vm_min_pu", "1.05").replace(
                "vm_max_pu = 1.1", "vm_max_pu = 1.0"
            ),
            ("vm_min_pu",),
        ),
        ("vm_min equals vm_max", scenario_text("grid", "vm_max_pu", "0.9"), ("vm_",)),
        ("k above the bus count", scenario_text("zones", "k", "[1, 4]"), ("k",)),
        ("k repeated", scenario_text("zones", "k", "[2, 2]"), ("zones.k", "once")),
        (
            "name with a control character",
            SCENARIO.replace('name = "fuzz"', 'name = "a\\u001b[31mb"'),
            ("name", "control"),
        ),
        (
            "reference MTU beyond the horizon",
            scenario_text("zones", "reference_mtu", "5"),
            ("reference_mtu",),
        ),
        (
            "time-zoned start on a SimBench grid",
            scenario_text("grid", "source", '"1-MV-rural--0-sw"').replace(
                '"2016-01-14 17:00"', '"2016-01-14T17:00+02:00"'
            ),
            ("start",),
        ),
    ]
    for name, text, expect in extra:
        if name == "duplicate key":
            text = SCENARIO.replace("vm_min_pu = 0.9", "vm_min_pu = 0.9\nvm_min_pu = 0.92")
            expect = ("scenario.toml", "line 7")
        cases.append(
            Case(
                "scenario",
                name,
                ("run", "scenario.toml", "--out", "out"),
                expect,
                {"scenario.toml": text, "grid.json": GRID},
            )
        )
    return cases


STORAGE_COLUMNS = ("energy_mwh", "soc_init_mwh", "efficiency")


def resources_cases(rng: np.random.Generator) -> list[Case]:
    """Bad resources CSVs: one field of one row broken, or the table's shape."""
    columns = RESOURCES_HEADER.split(",")
    bad_values = {
        "resource_id": ["", '"R\nlfm-zonal: error: spoofed"', '"R\x07"'],
        "bus": ["99", "-1", "two", "1.5", ""],
        "kind": ["battery", "", "LOAD"],
        "aggregator": ['"agg\r1"'],
        "direction": ["sideways", "", "upward"],
        "p_max_mw": ["-1", "inf", "nan", "abc", "", "1e300"],
        "cost_up_eur_per_mwh": ["-5", "inf", "nan", "x", "1e300"],
        "cost_down_eur_per_mwh": ["-1", "inf", "1e301", "?"],
        "tan_phi": ["inf", "nan", "1e6", "abc"],
        "energy_mwh": ["-1", "inf", "abc"],
        "soc_init_mwh": ["5", "-1", "nan"],
        "efficiency": ["0", "1.5", "-0.5", "inf"],
    }
    cases = []
    for column, values in bad_values.items():
        j = columns.index(column)
        for value in values:
            # Storage columns matter on the storage row; the others on a random row.
            row = 2 if column in STORAGE_COLUMNS else int(rng.integers(0, 2))
            rows = [r.split(",") for r in RESOURCES_ROWS]
            rows[row][j] = value
            text = RESOURCES_HEADER + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
            expect = (f"row {row + 2}",)
            cases.append(_resources_case(f"{column}={value!r} in row {row + 2}", text, expect))
    # Two fields broken at once, drawn at random: the error names the file and a row.
    fields = [(c, v) for c, values in bad_values.items() for v in values]
    for _ in range(30):
        rows = [r.split(",") for r in RESOURCES_ROWS]
        picks = rng.choice(len(fields), size=2, replace=False)
        names = []
        for pick in picks:
            column, value = fields[int(pick)]
            row = int(rng.integers(0, len(rows)))
            if column in STORAGE_COLUMNS:  # checked on storage rows only
                row = 2
            rows[row][columns.index(column)] = value
            names.append(f"{column}={value!r}@{row + 2}")
        text = RESOURCES_HEADER + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
        name = " and ".join(names)
        if any(c.name == name for c in cases):
            continue
        cases.append(_resources_case(name, text, ("resources.csv", "row")))
    shapes = [
        ("duplicate id", RESOURCES_ROWS + ["A,agg3,1,load,up,1,60,0,0,,,"], ("duplicate",)),
        ("missing column", None, ("p_max_mw",)),
        ("unknown column", None, ("colour",)),
        ("not a table", None, ("resources.csv",)),
    ]
    for name, rows, expect in shapes:
        if name == "duplicate id":
            text = RESOURCES_HEADER + "\n" + "\n".join(rows) + "\n"
        elif name == "missing column":
            text = "\n".join(
                ",".join(c for k, c in enumerate(r.split(",")) if k != 5)
                for r in [RESOURCES_HEADER, *RESOURCES_ROWS]
            )
        elif name == "unknown column":
            text = "\n".join(r + ",x" for r in [RESOURCES_HEADER + ",colour"][:1]) + "\n"
            text += "\n".join(r + ",red" for r in RESOURCES_ROWS) + "\n"
            text = text.replace(",colour,x", ",colour")
        else:
            text = "this is not,\na,table\n\x00\x01"
        cases.append(_resources_case(name, text, expect))
    return cases


def _resources_case(name: str, text: str, expect: tuple[str, ...]) -> Case:
    scenario = scenario_text("flexibility", "csv", '"resources.csv"')
    return Case(
        "resources",
        name,
        ("run", "scenario.toml", "--out", "out"),
        expect,
        {"scenario.toml": scenario, "grid.json": GRID, "resources.csv": text},
    )


def profiles_cases(rng: np.random.Generator) -> list[Case]:
    header = "time,load_0_p_mw,load_1_p_mw,sgen_0_p_mw"
    good = ["2016-01-14 17:00,6.0,1.0,0.5", "2016-01-14 18:00,6.2,1.1,0.0"]
    cases = []
    for column in (1, 2, 3):
        for value in ("inf", "-inf", "nan", "abc", "", "1e12", "-1e12"):
            rows = [r.split(",") for r in good]
            row = int(rng.integers(0, 2))
            rows[row][column] = value
            name = header.split(",")[column]
            text = header + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
            cases.append(_profiles_case(f"{name}={value!r} in row {row + 2}", text, (name,)))
    for value in ("not a time", "2016-13-45 10:00", ""):
        text = header + "\n" + good[0] + "\n" + value + ",6,1,0\n"
        cases.append(_profiles_case(f"time={value!r}", text, ("time",)))
    shapes = [
        ("duplicated time row", header + "\n" + good[0] + "\n" + good[0] + "\n" + good[1] + "\n"),
        ("unknown column", header + ",load_9_p_mw\n" + "\n".join(r + ",1" for r in good) + "\n"),
        ("badly named column", header + ",pv_power\n" + "\n".join(r + ",1" for r in good) + "\n"),
        ("too short", header + "\n" + good[0] + "\n"),
        ("outside the horizon", header + "\n2017-05-01 00:00,6,1,0\n2017-05-01 01:00,6,1,0\n"),
        ("empty", ""),
        ("binary", "\x00\x01\x02\x03"),
    ]
    expects = {
        "duplicated time row": ("2016-01-14 17:00",),
        "unknown column": ("load_9_p_mw",),
        "badly named column": ("pv_power",),
        "too short": ("profiles.csv",),
        "outside the horizon": ("profiles.csv",),
        "empty": ("profiles.csv",),
        "binary": ("profiles.csv",),
    }
    for name, text in shapes:
        cases.append(_profiles_case(name, text, expects[name]))
    return cases


def _profiles_case(name: str, text: str, expect: tuple[str, ...]) -> Case:
    scenario = scenario_text("profiles", "csv", '"profiles.csv"')
    return Case(
        "profiles",
        name,
        ("run", "scenario.toml", "--out", "out"),
        expect,
        {"scenario.toml": scenario, "grid.json": GRID, "profiles.csv": text},
    )


def grid_cases() -> list[Case]:
    """Bad grid JSONs: one pandapower table field broken."""
    edits = [
        ("load on unknown bus", "load", 0, "bus", 42, ("load 0",)),
        ("sgen on unknown bus", "sgen", 0, "bus", 17, ("sgen 0",)),
        ("bus index as text", "load", 1, "bus", "one", ("load 1",)),
        ("zero impedance", "line", 1, ("r_ohm_per_km", "x_ohm_per_km"), 0.0, ("line 1",)),
        ("NaN resistance", "line", 0, "r_ohm_per_km", None, ("line 0",)),
        ("zero length", "line", 1, "length_km", 0.0, ("line 1",)),
        ("negative length", "line", 0, "length_km", -2.0, ("line 0",)),
        ("zero rating", "line", 1, "max_i_ka", 0.0, ("line 1",)),
        ("NaN rating", "line", 0, "max_i_ka", None, ("line 0",)),
        ("zero voltage level", "bus", 1, "vn_kv", 0.0, ("bus 1",)),
        ("negative voltage level", "bus", 2, "vn_kv", -20.0, ("bus 2",)),
        ("ext_grid at 0 p.u.", "ext_grid", 0, "vm_pu", 0.0, ("ext_grid 0",)),
        ("ext_grid on unknown bus", "ext_grid", 0, "bus", 99, ("ext_grid 0",)),
        ("line to unknown bus", "line", 1, "to_bus", 77, ("line 1",)),
        ("infinite load", "load", 0, "p_mw", float("inf"), ("load 0",)),
        ("NaN load", "load", 1, "p_mw", None, ("load 1",)),
        ("infinite sgen", "sgen", 0, "p_mw", float("inf"), ("sgen 0",)),
        ("NaN reactance", "line", 1, "x_ohm_per_km", None, ("line 1",)),
        ("NaN voltage level", "bus", 0, "vn_kv", None, ("bus 0",)),
        ("ext_grid at NaN p.u.", "ext_grid", 0, "vm_pu", None, ("ext_grid 0",)),
        ("line from unknown bus", "line", 0, "from_bus", 55, ("line 0",)),
        ("load of 1e9 MW", "load", 0, "p_mw", 1e9, ("load 0", "p_mw")),
        ("sgen of -1e5 Mvar", "sgen", 0, "q_mvar", -1e5, ("sgen 0", "q_mvar")),
    ]
    cases = []
    for name, table, index, columns, value, expect in edits:
        text = _edited_grid(table, index, columns, value)
        cases.append(_grid_case(name, text, expect))
    for name, text, expect in [
        ("no ext_grid", _without_rows("ext_grid"), ("ext_grid",)),
        ("not JSON", "{this is not json", ("grid.json",)),
        ("empty file", "", ("grid.json",)),
        ("JSON but not a grid", json.dumps({"hello": "world"}), ("grid.json",)),
        (
            "a table that is not a table",
            json.dumps(
                {
                    "_module": "pandapower.auxiliary",
                    "_class": "pandapowerNet",
                    "_object": {"bus": "notatable"},
                }
            ),
            ("grid.json", "bus"),
        ),
        ("binary", b"\x89PNG\r\n\x1a\n\x00\x00", ("grid.json",)),
        ("UTF-16", GRID.encode("utf-16"), ("grid.json",)),
    ]:
        cases.append(_grid_case(name, text, expect))
    return cases


def _grid_case(name: str, text, expect: tuple[str, ...]) -> Case:
    return Case(
        "grid",
        name,
        ("powerflow", "--grid", "grid.json", "--n-mtu", "1", "--out", "pf.csv"),
        expect,
        {"grid.json": text},
    )


def _edited_grid(table: str, index: int, columns, value) -> str:
    import pandapower as pp

    net = pp.from_json_string(GRID)
    for column in (columns,) if isinstance(columns, str) else columns:
        frame = net[table]
        if isinstance(value, str):
            frame[column] = frame[column].astype(object)
        frame.at[index, column] = np.nan if value is None else value
    return pp.to_json(net)


def _without_table(table: str) -> str:
    data = json.loads(GRID)
    data["_object"].pop(table, None)
    return json.dumps(data)


def _without_rows(table: str) -> str:
    import pandapower as pp

    net = pp.from_json_string(GRID)
    net[table] = net[table].iloc[0:0]
    return pp.to_json(net)


def cli_cases() -> list[Case]:
    """Bad command-line values (the scenario and grid themselves are fine)."""
    base = {"scenario.toml": SCENARIO, "grid.json": GRID}
    flags = {
        "--n-mtu": ["0", "-1", "abc", "1e9", "100000000"],
        "--mtu-minutes": ["0", "-15", "x"],
        "--start": ["", "yesterday", "1200-01-01", "2300-01-01"],
        "--load-scale": ["-1", "inf", "nan", "x"],
        "--sgen-scale": ["-3", "inf", "nan"],
        "--vm-min-pu": ["-1", "nan", "2", "inf"],
        "--vm-max-pu": ["0", "nan", "0.5", "-inf"],
        "--loading-max-percent": ["0", "-5", "inf", "nan"],
    }
    cases = []
    for flag, values in flags.items():
        for value in values:
            argv = ("powerflow", "--scenario", "scenario.toml", flag, value)
            expect = (flag.lstrip("-").replace("-", "_"),)
            if flag in ("--start", "--n-mtu", "--mtu-minutes") and value in ("1200-01-01",):
                expect = ("start",)
            cases.append(Case("cli", f"powerflow {flag} {value!r}", argv, expect, dict(base)))
    runs = [
        (("run", "scenario.toml", "--out", "scenario.toml"), ("scenario.toml",)),
        (("run", "scenario.toml", "--out", "scenario.toml/sub"), ("scenario.toml",)),
        (("run", "scenario.toml", "--out", ".", "--overwrite"), ("out",)),
        (("run", "scenario.toml", "--out", "", "--overwrite"), ("out",)),
        (("run", "scenario.toml", "--out", "/proc/lfm"), ("/proc",)),
        (("run", "missing.toml", "--out", "out"), ("missing.toml",)),
        (("clear", "--scenario", "scenario.toml", "--market", "nodal", "--k", "2"), ("--k",)),
        (("clear", "--scenario", "scenario.toml", "--market", "zonal", "--k", "0"), ("k",)),
        (("clear", "--scenario", "scenario.toml", "--market", "auction"), ("auction",)),
        (("sensitivities", "--scenario", "scenario.toml", "--mtu", "99"), ("99",)),
        (("sensitivities", "--scenario", "scenario.toml", "--method", "newton"), ("newton",)),
        (("zones", "--scenario", "scenario.toml", "--k", "0"), ("k",)),
        (("zones", "--scenario", "scenario.toml", "--k", "50"), ("k",)),
        (("powerflow", "--scenario", "scenario.toml", "--out", "grid.json"), ("grid.json",)),
        (("powerflow", "--scenario", "scenario.toml", "--out", "."), ("out",)),
        (("sweep", "scenario.toml", "--days", "2016-04-10:2016-04-09", "--out", "sw"), ("days",)),
        (("sweep", "scenario.toml", "--days", "x", "--out", "sw"), ("days",)),
        (
            ("sweep", "scenario.toml", "--days", "2016-01-14", "--workers", "-1", "--out", "sw"),
            ("workers",),
        ),  # fmt: skip
        (
            ("sweep", "scenario.toml", "--days", "2016-01-14", "--seeds", "3:1", "--out", "sw"),
            ("seeds",),
        ),  # fmt: skip
        (("sweep", "scenario.toml", "--days", "2016-01-01:2030-01-01", "--out", "sw"), ("days",)),
        (
            ("sweep", "scenario.toml", "--days", "2016-01-14", "--seeds", "1e30", "--out", "sw"),
            ("seeds",),
        ),  # fmt: skip
        (("powerflow", "--grid", "synthetic_radial_10000000", "--out", "pf.csv"), ("10000000",)),
        (
            ("powerflow", "--scenario", "scenario.toml", "--rows", "-1", "--out", "pf.csv"),
            ("rows",),
        ),  # fmt: skip
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--k", "1:inf", "--out", "sw"), ("k",)),
        # An empty or repeated sweep value is a mistake, named by its flag.
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--methods", "", "--out", "sw"), ("--methods",)),
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--k", "", "--out", "sw"), ("--k",)),
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--seeds", " ", "--out", "sw"), ("--seeds",)),
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--k", "2,2", "--out", "sw"), ("--k", "twice")),
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--seeds", "1,1", "--out", "sw"), ("--seeds", "twice")),
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--k", "0", "--out", "sw"), ("--k 0", "zones.k")),
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--seeds=-1", "--out", "sw"), ("--seeds -1", "seed")),
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--methods", "foo", "--out", "sw"), ("--methods foo",)),
        (("sweep", "scenario.toml", "--days", "2016-01-14,2016-01-14", "--out", "sw"), ("--days", "twice")),
        # A folder that holds no sweep is never resumed into, and sweep has no --overwrite.
        (("sweep", "scenario.toml", "--days", "2016-01-14", "--out", "grid.json"), ("grid.json",)),
    ]  # fmt: skip
    for argv, expect in runs:
        cases.append(Case("cli", " ".join(argv), argv, expect, dict(base)))
    return cases


def tender_cases() -> list[Case]:
    bad = {
        "sigma_mw": ["inf", "nan", "-1"],
        "mu_mu_mw": ["inf", "1e300", "-5", "nan"],
        "points_per_offer": ["0", "-1", "1000000000", "1.5", "x"],
        "bid_size_ratio": ["0", "-0.3", "1e-12", "inf"],
        "p_av_std_ratio": ["1e9", "-1", "inf", "nan"],
        "voll_eur_per_mwh": ["-1", "inf", "nan"],
        "no_such_parameter": ["1"],
    }
    cases = []
    for key, values in bad.items():
        for value in values:
            argv = ("tender", "optimum", "--set", f"{key}={value}", "--out", "tender")
            cases.append(Case("tender", f"{key}={value}", argv, (key,), {}))
    for argv, expect in [
        (("tender", "spatial", "--gini", "1.5", "--out", "t"), ("gini",)),
        (("tender", "spatial", "--gini", "-0.1", "--out", "t"), ("gini",)),
        (("tender", "spatial", "--n-nodes", "0", "--out", "t"), ("n",)),
        (("tender", "spatial", "--n-nodes", "1000000", "--out", "t"), ("n",)),
        (("tender", "temporal", "--sigma-mu", "nan", "--out", "t"), ("sigma",)),
        (("tender", "temporal", "--sigma-mu", "inf", "--out", "t"), ("sigma",)),
        (("tender", "optimum", "--params", "missing.toml", "--out", "t"), ("missing.toml",)),
        (("tender", "optimum", "--set", "sigma_mw", "--out", "t"), ("sigma_mw",)),
        (("tender", "temporal", "--sigma-mu", "0:inf", "--out", "t"), ("sigma",)),
        (("tender", "temporal", "--n-mtu", "2:inf", "--out", "t"), ("n_mtu",)),
        (("tender", "spatial", "--gini", "0:inf", "--out", "t"), ("gini",)),
        (("tender", "spatial", "--n-nodes", "2,3", "--gini", "0.99", "--out", "t"), ("gini",)),
        (("tender", "spatial", "--n-nodes", "1:1e12", "--out", "t"), ("n_nodes",)),
        (("tender", "optimum", "--params", "p.toml", "--out", "t"), ("sigma_mw",)),
    ]:
        files = {"p.toml": 'sigma_mw = "2"\n'} if "p.toml" in argv else {}
        cases.append(Case("tender", " ".join(argv[1:]), argv, expect, files))
    return cases


def encoding_cases() -> list[Case]:
    """Input files that are not UTF-8 text."""
    latin = SCENARIO.replace('name = "fuzz"', 'name = "Zürich"').encode("latin-1")
    utf16 = SCENARIO.encode("utf-16")
    binary = bytes(range(256)) * 4
    cases = []
    for name, data in (("Latin-1", latin), ("UTF-16", utf16), ("binary", binary)):
        cases.append(
            Case(
                "encoding",
                f"scenario in {name}",
                ("run", "scenario.toml", "--out", "out"),
                ("scenario.toml",),
                {"scenario.toml": data, "grid.json": GRID},
            )
        )
        scenario = scenario_text("flexibility", "csv", '"resources.csv"')
        resources = (RESOURCES_HEADER + "\n" + "\n".join(RESOURCES_ROWS) + "\n").replace(
            "agg1", "Müller"
        )
        encoded = {
            "Latin-1": resources.encode("latin-1"),
            "UTF-16": resources.encode("utf-16"),
            "binary": binary,
        }[name]
        cases.append(
            Case(
                "encoding",
                f"resources in {name}",
                ("run", "scenario.toml", "--out", "out"),
                ("resources.csv",),
                {"scenario.toml": scenario, "grid.json": GRID, "resources.csv": encoded},
            )
        )
        scenario = scenario_text("profiles", "csv", '"profiles.csv"')
        profiles = "time,load_0_p_mw\n2016-01-14 17:00,6\n2016-01-14 18:00,6\n"
        encoded = {
            "Latin-1": ("# Zürich\n" + profiles).encode("latin-1"),
            "UTF-16": profiles.encode("utf-16"),
            "binary": binary,
        }[name]
        cases.append(
            Case(
                "encoding",
                f"profiles in {name}",
                ("run", "scenario.toml", "--out", "out"),
                ("profiles.csv",),
                {"scenario.toml": scenario, "grid.json": GRID, "profiles.csv": encoded},
            )
        )
    return cases


GRID = three_bus_json()


def all_cases() -> list[Case]:
    rng = np.random.default_rng(SEED)
    cases = (
        scenario_cases()
        + resources_cases(rng)
        + profiles_cases(rng)
        + grid_cases()
        + cli_cases()
        + tender_cases()
        + encoding_cases()
    )
    ids = [c.id for c in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, duplicates
    return cases


CASES = all_cases()


# ----------------------------------------------------------------------------- the checks


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def test_the_suite_is_large_and_covers_every_class():
    counts = {k: len(list(g)) for k, g in itertools.groupby(sorted(c.kind for c in CASES))}
    assert sum(counts.values()) >= 500, counts
    assert set(counts) == {
        "scenario",
        "resources",
        "profiles",
        "grid",
        "cli",
        "tender",
        "encoding",
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line(case: Case, tmp_path, monkeypatch, capsys):
    for name, content in case.files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    before = _digest(tmp_path)
    monkeypatch.chdir(tmp_path)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        code = main(list(case.argv))
    except _Timeout:
        pytest.fail(f"hung for {CASE_TIMEOUT_S} s")
    except SystemExit as exc:  # argparse
        code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}; stderr: {err!r}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"stderr has {len(lines)} lines: {err!r}"
    assert lines[0].startswith("lfm-zonal: error: "), lines[0]
    named = lines[0].lower().replace("-", "_")  # a flag --n-mtu names the key n_mtu
    for word in case.expect:
        assert word.lower().replace("-", "_") in named, f"{word!r} not named in {lines[0]!r}"
    assert _digest(tmp_path) == before, "an input file was changed or an output written"
    leftovers = {p.name for p in tmp_path.iterdir()} - set(case.files)
    assert not leftovers, f"left behind: {sorted(leftovers)}"
