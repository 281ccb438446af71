"""Real DSO scale (issue 13), the input and output side: profiles read for the horizon only,
compact result files, sensitivities in a binary format, progress lines of a run."""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import small_scenario

from lfm_zonal import Horizon, load_grid, load_profiles, progress
from lfm_zonal.cli import main
from lfm_zonal.study.workers import in_order


def _year_profiles(grid, horizon: Horizon) -> dict[str, pd.DataFrame]:
    """The profiles as they were computed before: SimBench's absolute values of the whole
    year, then the horizon's rows averaged per MTU."""
    import simbench as sb

    from lfm_zonal.grid.profiles import _simbench_rows

    rows = _simbench_rows(horizon)
    absolute = sb.get_absolute_values(grid.net, profiles_instead_of_study_cases=True)
    out = {}
    for element, column in (("load", "p_mw"), ("load", "q_mvar"), ("sgen", "p_mw")):
        values = absolute[(element, column)].reindex(columns=grid.net[element].index)
        out[f"{element}_{column}"] = values.to_numpy(float)[rows].mean(axis=1)
    return out


@pytest.mark.parametrize(
    ("start", "n_mtu", "mtu_minutes"),
    [("2016-04-16 00:00", 96, 15), ("2016-03-01 10:00", 3, 30), ("2016-12-31 22:00", 2, 60)],
)
def test_simbench_profiles_of_the_horizon_equal_those_of_the_year(start, n_mtu, mtu_minutes):
    grid = load_grid("1-MV-rural--0-sw")
    horizon = Horizon(start=start, n_mtu=n_mtu, mtu_minutes=mtu_minutes)
    profiles = load_profiles(grid, horizon)
    expected = _year_profiles(grid, horizon)
    for name, values in expected.items():
        got = getattr(profiles, name)
        assert got.shape == values.shape
        np.testing.assert_array_equal(got.to_numpy(), values)  # the same numbers, bit for bit
        assert got.index.equals(horizon.times)
    stored_q = grid.net.sgen.q_mvar.to_numpy(float)
    np.testing.assert_array_equal(profiles.sgen_q_mvar.to_numpy(), np.tile(stored_q, (n_mtu, 1)))


def test_simbench_profiles_scale_only_the_rows_of_the_horizon(monkeypatch):
    """The relative profiles are sliced before they are spread over the elements: no table of
    a year x elements is built (it was 4.9 GB on 1-MVLV-rural-all-0-sw)."""
    import simbench.networks.profiles as sbp

    seen = []
    original = sbp.get_absolute_profiles_from_relative_profiles

    def spy(net, element, column, relative_profiles=None, **kwargs):
        seen.append(len(relative_profiles))
        return original(net, element, column, relative_profiles=relative_profiles, **kwargs)

    monkeypatch.setattr(sbp, "get_absolute_profiles_from_relative_profiles", spy)
    grid = load_grid("1-MV-rural--0-sw")
    load_profiles(grid, Horizon(start="2016-04-16 00:00", n_mtu=4, mtu_minutes=30))
    assert seen == [8, 8, 8]  # load P, load Q, sgen P: 4 MTUs of two quarter hours each


# --------------------------------------------------------------------------- progress lines

STAGE_LINE = re.compile(r"^lfm-zonal: \[ *(\d+\.\d) s\] (.+)$")


def _small_scenario(folder: Path) -> Path:
    """The default scenario on 4 MTUs of its evening peak, nodal and zonal at K = 1 and 2."""
    return small_scenario(folder)


def _assert_stages(err: str, expected: list[str]) -> None:
    """The stage lines of ``err`` start with the ``expected`` texts, in order, with elapsed
    times that never go back; the last says the total."""
    stages = [m.groups() for line in err.splitlines() if (m := STAGE_LINE.match(line))]
    messages = [text for _, text in stages]
    assert len(messages) == len(expected), err
    for text, start in zip(messages, expected, strict=True):
        assert text.startswith(start), (text, start)
    seconds = [float(s) for s, _ in stages]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert messages[-1] == f"finished in {seconds[-1]:.1f} s"


RUN_STAGES = [
    "base case: 4 MTUs on grid cigre_mv",
    "resources:",
    "zones: sensitivities and features at MTU",
    "zones: K = 1, 2 and their segmentation errors done",
    "zones: K = 1 indices and map written",
    "zones: K = 2 indices and map written",
    "zones: error curve over",
    "nodal market: cleared and checked in AC, cost",
    "zonal market K = 1: cleared and checked in AC, cost",
    "zonal market K = 2: cleared and checked in AC, cost",
]


def test_a_run_prints_its_stages_with_elapsed_times_in_order(tmp_path, capsys):
    """In one process: the zones folder is written first, then the markets, K ascending."""
    out = tmp_path / "out"
    code = main(["run", str(_small_scenario(tmp_path)), "--out", str(out), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    _assert_stages(err, [*RUN_STAGES, f"results written to {out}", "finished in"])
    # --quiet: neither progress bars nor stage lines.
    main(["run", str(_small_scenario(tmp_path)), "--out", str(tmp_path / "q"), "--quiet"])
    assert not any(STAGE_LINE.match(line) for line in capsys.readouterr().err.splitlines())


def test_a_run_with_two_workers_prints_every_stage_once(tmp_path, capfd):
    """Two worker processes write their own lines on the same stderr (captured at the file
    descriptor): every stage once, the zones folder's in order, then the results."""
    out = tmp_path / "out"
    code = main(["run", str(_small_scenario(tmp_path)), "--out", str(out), "--workers", "2"])
    err = capfd.readouterr().err
    assert code == 0, err
    stages = [m.groups() for line in err.splitlines() if (m := STAGE_LINE.match(line))]
    lines = [text for _, text in stages]
    assert len(lines) == len(RUN_STAGES) + 2, err
    found = [next(i for i, line in enumerate(lines) if line.startswith(s)) for s in RUN_STAGES]
    assert found[:4] == [0, 1, 2, 3]  # before the workers start
    assert found[4] < found[5] < found[6]  # the zones folder, in one worker
    assert sorted(found[4:]) == list(range(4, len(RUN_STAGES)))
    assert lines[-2:] == [f"results written to {out}", lines[-1]]
    assert lines[-1].startswith("finished in")


def test_an_input_refused_after_the_base_case_is_still_one_line(tmp_path, capsys):
    """The zone count is checked against the grid's buses after the base case is solved: the
    stage lines held until then are dropped, the refusal is the one line on stderr."""
    scenario = _small_scenario(tmp_path)
    scenario.write_text(re.sub(r"(?m)^k = .*$", "k = [1, 500]", scenario.read_text()))
    code = main(["run", str(scenario), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lfm-zonal: error:") and "500" in err
    assert not (tmp_path / "out").exists()


def test_zones_powerflow_and_sensitivities_print_their_stages(tmp_path, capsys):
    """With stderr redirected (as under pytest), each long command says what it has done and
    when; --quiet silences it."""
    scenario = str(_small_scenario(tmp_path))
    zones = tmp_path / "zones"
    code = main(["zones", "--scenario", scenario, "--out", str(zones)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert all(STAGE_LINE.match(line) for line in err.splitlines()), err  # nothing else
    _assert_stages(
        err,
        [
            "base case: 4 MTUs on grid cigre_mv (",
            "zones: sensitivities and features at MTU",
            "zones: K = 1 done",
            "zones: K = 2 done",
            "zones: K = 1 indices and map written",
            "zones: K = 2 indices and map written",
            "zones: error curve over",
            f"results written to {zones}",
            "finished in",
        ],
    )
    assert (zones / "zones.csv").exists() and (zones / "error_curve.csv").exists()
    table = tmp_path / "pf.csv"
    code = main(["powerflow", "--scenario", scenario, "--out", str(table)])
    err = capsys.readouterr().err
    assert code == 0, err
    _assert_stages(
        err,
        [
            "base case: 4 MTUs on grid cigre_mv (",
            f"violations per MTU written to {table}",
            "finished in",
        ],
    )
    assert len(pd.read_csv(table)) == 4
    folder = tmp_path / "sens"
    code = main(["sensitivities", "--scenario", scenario, "--mtu", "1", "--mtu", "3",
                 "--out", str(folder)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    _assert_stages(
        err,
        [
            "base case: 4 MTUs on grid cigre_mv (",
            "sensitivities: MTU 1 (2016-01-14 17:15:00) computed by jacobian",
            "sensitivities: MTU 1 written as csv",
            "sensitivities: MTU 3 (2016-01-14 17:45:00) computed by jacobian",
            "sensitivities: MTU 3 written as csv",
            f"results written to {folder}",
            "finished in",
        ],
    )
    for argv in (
        ["zones", "--scenario", scenario, "--out", str(tmp_path / "zq")],
        ["powerflow", "--scenario", scenario],
        ["sensitivities", "--scenario", scenario, "--out", str(tmp_path / "sq")],
    ):
        assert main([*argv, "--quiet"]) == 0
        assert capsys.readouterr().err == "", argv


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        # refused once the base case is solved (its stage line held back, then dropped)
        (["zones", "--k", "1", "--k", "500"], "'zones.k' = 500 is out of range"),
        (["sensitivities", "--mtu", "2", "--mtu", "9"], "MTU 9 is outside the horizon"),
        (["sensitivities", "--elements", "line:99"], "--elements line:99"),
        (["zones", "--out", "taken"], "exists and is not empty"),  # --out, checked last
        (["sensitivities", "--out", "taken"], "exists and is not empty"),
        (["powerflow", "--out", "pf.csv"], "pf.csv exists (use --overwrite"),
        # refused before any stage
        (["zones", "--reference-mtu", "9"], "'zones.reference_mtu' must be below"),
        (["powerflow", "--profiles", "short.csv"], "outside the profile range"),
    ],
)
def test_an_input_refused_by_zones_sensitivities_or_powerflow_is_one_line(
    tmp_path, capsys, monkeypatch, argv, named
):
    """Refused after the base case was solved or before: the one error line on stderr,
    exit code 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    Path("short.csv").write_text("time,load_0_p_mw\n2016-01-14 17:00,1\n")
    Path("taken").mkdir()
    Path("taken", "notes.txt").write_text("mine\n")
    Path("pf.csv").write_text("mine\n")
    scenario = str(_small_scenario(tmp_path))
    out = [] if "--out" in argv else ["--out", "out"]
    code = main([*argv, "--scenario", scenario, *out])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lfm-zonal: error:") and named in err, err
    assert not Path("out").exists() and Path("pf.csv").read_text() == "mine\n"
    assert sorted(p.name for p in Path("taken").iterdir()) == ["notes.txt"]


def test_held_stage_lines_go_out_after_the_hold_time(capsys):
    with progress.reporting(hold_s=0.05):
        progress.stage("first")
        assert capsys.readouterr().err == ""  # held: inputs not accepted yet
        time.sleep(0.5)
        assert STAGE_LINE.match(capsys.readouterr().err.strip()).group(2) == "first"
        progress.stage("second")  # after the hold: at once
        assert capsys.readouterr().err.strip().endswith("] second")
    with pytest.raises(RuntimeError), progress.reporting():
        progress.stage("dropped")
        raise RuntimeError("a failure before the inputs were accepted")
    assert capsys.readouterr().err == ""
    progress.stage("no command: silent")
    assert capsys.readouterr().err == "" and progress.elapsed_s() is None


# --------------------------------------------------------------------------- sensitivities


def _sensitivities_cli(tmp_path, capsys, name, *extra):
    argv = ["sensitivities", "--grid", "ieee33", "--n-mtu", "2", "--mtu", "1"]
    code = main([*argv, *extra, "--out", str(tmp_path / name)])
    out, err = capsys.readouterr()
    return code, out, err, tmp_path / name / "mtu_1"


def test_sensitivities_as_npz_hold_the_csv_numbers_and_labels(tmp_path, capsys):
    from lfm_zonal.study.results import read_sensitivities

    code, out, err, csv = _sensitivities_cli(tmp_path, capsys, "csv")  # small: auto is CSV
    assert code == 0 and "as csv" in out, err
    code, out, err, npz = _sensitivities_cli(tmp_path, capsys, "npz", "--format", "npz")
    assert code == 0 and sorted(p.name for p in npz.iterdir()) == ["sensitivities.npz"]
    sens = read_sensitivities(npz / "sensitivities.npz")
    assert sens.method == "jacobian" and sens.time == pd.Timestamp("2016-01-14 00:15")
    for name, index_col in (("loading_p", [0, 1]), ("loading_q", [0, 1]), ("vm_p", 0), ("vm_q", 0)):
        expected = pd.read_csv(csv / f"{name}.csv", index_col=index_col)
        got = getattr(sens, name)
        assert list(got.index) == list(expected.index)  # pandapower indices as labels
        assert [str(b) for b in got.columns] == list(expected.columns)
        np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-9, atol=1e-14)
    with np.load(npz / "sensitivities.npz", allow_pickle=False) as data:  # no pickle needed
        assert data["branch_element_type"][0] == "line" and data["bus"].dtype == np.int64


def test_sensitivities_of_chosen_rows_and_columns(tmp_path, capsys):
    code, _, err, folder = _sensitivities_cli(
        tmp_path, capsys, "some", "--elements", "line:3,0", "--elements", "bus:17", "--buses", "0:4"
    )
    assert code == 0, err
    loading = pd.read_csv(folder / "loading_p.csv", index_col=[0, 1])
    assert list(loading.index) == [("line", 3), ("line", 0)]
    assert list(loading.columns) == ["0", "1", "2", "3", "4"]
    vm = pd.read_csv(folder / "vm_q.csv", index_col=0)
    assert list(vm.index) == [17] and vm.shape == (1, 5)
    for extra, named in (
        (("--elements", "line:99"), "--elements line:99"),
        (("--elements", "trafo:0"), "--elements trafo"),
        (("--buses", "5,400"), "--buses 400"),
        (("--elements", "line"), "--elements 'line'"),
    ):
        code, _, err, folder = _sensitivities_cli(tmp_path, capsys, "bad", *extra)
        assert code == 2 and err.count("\n") == 1 and named in err, err
        assert not (tmp_path / "bad").exists()


def test_a_big_sensitivity_matrix_is_written_as_npz_by_default(tmp_path, capsys, monkeypatch):
    import lfm_zonal.study.results as results

    monkeypatch.setattr(results, "SENSITIVITY_CSV_MAX_BYTES", 10_000)  # ieee33: ~70 kB as CSV
    code, out, _, folder = _sensitivities_cli(tmp_path, capsys, "big")
    assert code == 0 and (folder / "sensitivities.npz").exists()
    assert "as npz" in out and "--format csv" in out
    code, out, _, folder = _sensitivities_cli(tmp_path, capsys, "forced", "--format", "csv")
    assert code == 0 and (folder / "vm_p.csv").exists()


# --------------------------------------------------------------------------- compact tables


def _awkward_table(n: int, seed: int = 0) -> pd.DataFrame:
    """Every kind of column a results table has, and the awkward values of each."""
    rng = np.random.default_rng(seed)
    times = pd.date_range("2016-04-16", periods=96, freq="15min")
    frame = pd.DataFrame(
        {
            "method": rng.choice(["nodal", "a,b", 'q"x', "new\nline", "", None], n),
            "k": rng.integers(-5, 10**12, n),
            "time": times[rng.integers(0, 96, n)],
            "day": pd.Timestamp("2016-01-01") + pd.to_timedelta(rng.integers(0, 3, n), "D"),
            "x_mw": rng.normal(size=n) * 10.0 ** rng.integers(-12, 12, n),
            "flag": rng.random(n) > 0.5,
            "small": rng.integers(0, 5, n).astype(np.uint8),
            "single": rng.normal(size=n).astype(np.float32),
            "mixed": np.array([1.5, "s", None, np.nan, 3], dtype=object)[rng.integers(0, 5, n)],
        }
    )
    frame.loc[rng.random(n) < 0.1, "x_mw"] = np.nan
    frame.loc[3, "x_mw"], frame.loc[4, "x_mw"] = -0.0, np.inf
    frame.loc[rng.random(n) < 0.05, "time"] = pd.NaT
    # pandas writes a dates-only chunk as dates, another with times of day in full
    frame.loc[: n // 2, "day"] = pd.Timestamp("2016-01-01")
    frame.loc[n - 2, "day"] = pd.Timestamp("2016-01-01 12:00")
    return frame


def test_tables_are_written_as_pandas_writes_them(tmp_path, monkeypatch):
    """write_csv and write_table (plain and gzip) write the bytes of pandas' to_csv with
    FLOAT_FORMAT: every column kind, missing values, text needing quotes, named and
    unnamed index levels, a column kind (categorical) and a header (MultiIndex) left to
    pandas; over several chunks of rows, a dates-only column written as pandas writes it
    in each (dates alone, or with the time of day where one has it)."""
    import lfm_zonal.files.outputs as outputs

    options = {"float_format": outputs.FLOAT_FORMAT, "lineterminator": "\n"}
    ours, theirs = tmp_path / "ours.csv", tmp_path / "theirs.csv"
    # pandas' own chunks: 12,000 rows of 9 columns are two
    frame = _awkward_table(12_000)
    outputs.write_csv(frame, ours, index=False)
    frame.to_csv(theirs, index=False, **options)
    assert ours.read_bytes() == theirs.read_bytes()
    written = ours.read_text()
    assert ",2016-01-01," in written and ",2016-01-01 00:00:00," in written
    assert '"a,b"' in written and '"q""x"' in written and '"new\nline"' in written

    monkeypatch.setattr(outputs, "FAST_WRITER_FROM_ROWS", 10)
    monkeypatch.setattr(outputs, "CSV_CHUNK_CELLS", 2000)  # chunks of 2000 // columns rows
    frame = _awkward_table(1200, seed=1)
    cases = {
        "plain": (frame, False),
        "index": (frame.set_index("k"), True),
        "two named levels": (frame.set_index(["method", "k"]), True),
        "unnamed index": (frame.set_axis(pd.RangeIndex(len(frame)) * 2), True),
        "float index": (frame.set_axis(pd.Index(np.linspace(-1, 1, len(frame)))), True),
        "categorical": (frame.assign(c=pd.Categorical(frame.flag.map(str))), False),
        "column levels": (
            frame[["k", "x_mw"]].set_axis(pd.MultiIndex.from_tuples([("a", 1), ("b", 2)]), axis=1),
            True,
        ),
        "number labels": (frame[["k", "x_mw"]].set_axis([0, 1], axis=1), True),
        "float labels": (frame[["k", "x_mw"]].set_axis([0.1 + 0.2, np.nan], axis=1), False),
        "time labels": (
            frame[["k", "x_mw"]].set_axis(pd.to_datetime(["2016-01-01", "2016-01-02"]), axis=1),
            True,
        ),
        "levels named 0 and False": (
            frame.set_index(["k", "flag"]).rename_axis([0, False]),
            True,
        ),
        "a time level": (frame.set_index(["day", "k"]), True),  # pandas: over all rows
        "no columns": (frame[[]], False),
    }
    for name, (table, index) in cases.items():
        outputs.write_csv(table, ours, index=index)
        table.to_csv(theirs, index=index, chunksize=2000 // max(len(table.columns), 1), **options)
        assert ours.read_bytes() == theirs.read_bytes(), name

    monkeypatch.setattr(outputs, "GZIP_ABOVE_ROWS", 100)
    (tmp_path / "pandas").mkdir()
    packed = outputs.write_table(frame, tmp_path / "table.csv")
    frame.to_csv(
        tmp_path / "pandas" / "table.csv.gz",  # the file's name is in the gzip header
        index=False,
        chunksize=2000 // len(frame.columns),
        compression={"method": "gzip", **outputs.GZIP_LEVEL},
        **options,
    )
    assert packed.name == "table.csv.gz"
    assert packed.read_bytes() == (tmp_path / "pandas" / "table.csv.gz").read_bytes()

    # Its text made in parts of 3 chunks (666 rows) by two forked processes: the same bytes.
    monkeypatch.setattr(outputs, "CSV_PART_CHUNKS", 3)
    made = []

    def counted(task, items, processes):
        made.append(len(items))
        return in_order(task, items, processes)

    in_parts = functools.partial(counted, processes=2)
    (tmp_path / "parts").mkdir()
    packed = outputs.write_table(frame, tmp_path / "parts" / "table.csv", map_parts=in_parts)
    assert packed.read_bytes() == (tmp_path / "pandas" / "table.csv.gz").read_bytes()
    outputs.write_csv(frame, ours, index=False, map_parts=in_parts)
    frame.to_csv(theirs, index=False, chunksize=2000 // len(frame.columns), **options)
    assert ours.read_bytes() == theirs.read_bytes()
    assert made == [2, 2]  # 1200 rows in parts of 666


def test_big_result_tables_are_written_gzip_compressed(tmp_path, capsys, monkeypatch):
    """Above GZIP_ABOVE_ROWS rows a table is NAME.csv.gz with the same columns and numbers,
    the same bytes on every run; below it the CSV is as before."""
    import lfm_zonal.files.outputs as outputs

    scenario = str(_small_scenario(tmp_path))
    assert main(["run", scenario, "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    monkeypatch.setattr(outputs, "GZIP_ABOVE_ROWS", 3)
    for name in ("gz", "gz_again"):
        assert main(["run", scenario, "--out", str(tmp_path / name), "--quiet"]) == 0
    capsys.readouterr()
    for table in ("activations", "accepted_bids", "zone_activations"):
        plain = tmp_path / "plain" / f"{table}.csv"
        packed = tmp_path / "gz" / f"{table}.csv.gz"
        assert len(pd.read_csv(plain)) > 3 and not (tmp_path / "gz" / f"{table}.csv").exists()
        pd.testing.assert_frame_equal(pd.read_csv(packed), pd.read_csv(plain))
        assert packed.read_bytes() == (tmp_path / "gz_again" / packed.name).read_bytes()
    # Small tables and kpis.csv stay plain CSV.
    assert (tmp_path / "gz" / "kpis.csv").exists() and (tmp_path / "gz" / "unmet.csv").exists()
