"""The command line: user mistakes give one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from lfm_zonal.cli import main
from lfm_zonal.files.outputs import MARKER
from lfm_zonal.study.scenario import load_scenario


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["powerflow", "--grid", "no_such_grid"], "unknown grid 'no_such_grid'"),
        (["powerflow", "--grid", "1-MV-nowhere--0-sw"], "unknown grid '1-MV-nowhere--0-sw'"),
        (["powerflow", "--grid", "missing.json"], "grid file not found: missing.json"),
        (  # where the start was given, as every scenario key
            ["powerflow", "--grid", "1-MV-rural--0-sw", "--start", "2017-03-01 00:00"],
            "error: --start: 'horizon.start': horizon 2017-03-01 00:00:00 .. 2017-03-01 23:45:00"
            " is outside the SimBench profile range",
        ),
        (["powerflow", "--grid", "1-MV-rural--0-sw", "--mtu-minutes", "20"], "multiple of 15"),
        (  # inside the year, off its quarter hours: said so, not "outside the range"
            ["powerflow", "--grid", "1-MV-rural--0-sw", "--start", "2016-04-16 00:07"],
            "--start: 'horizon.start': horizon start 2016-04-16 00:07:00: SimBench profiles are "
            "quarter-hourly, start on "
            "a quarter hour (:00, :15, :30 or :45)",
        ),
        (["powerflow", "--n-mtu", "0"], "'horizon.n_mtu' must be > 0"),
        (["powerflow", "--profiles", "nope.csv"], "profile file not found: nope.csv"),
        # a folder where a file is asked for is named as such, not as missing
        (["powerflow", "--grid", "."], "grid file . is a folder, not a file"),
        (["powerflow", "--profiles", "."], "profile file . is a folder, not a file"),
        (["clear", "--market", "nodal", "--resources", "."], "resource file . is a folder"),
        (["run", "."], "scenario TOML . is a folder, not a file"),
        (["tender", "grid", "--k", "99"], "--k: 'zones.k' = 99 is out of range: the grid has 15"),
        (["run", "no_such_scenario.toml"], "scenario not found: no_such_scenario.toml"),
        (["sensitivities", "--n-mtu", "4", "--mtu", "9"], "MTU 9 is outside the horizon"),
        (["zones", "--k", "1", "--k", "1"], "--k 1 is given twice"),
        (
            ["sensitivities", "--mtu", "2", "--mtu", "2016-01-14 00:30"],
            "--mtu 2016-01-14 00:30: MTU 2 (2016-01-14 00:30:00) is given twice",
        ),
        (["sensitivities", "--n-mtu", "4", "--mtu", "-1"], "MTU -1 is outside the horizon"),
        (["sweep", "--days", "2016-01-14", "--k", "2", "--k", "1:3"], "--k 2 is given twice"),
        (["zones", "--k", ""], "--k '' is empty"),
        # an empty value within a list is a typo, not skipped; a range runs up
        (["zones", "--k", "1,,2"], "--k '1,,2': an empty value in the list"),
        (["sweep", "--days", "2016-01-14", "--seeds", "0,1,"], "--seeds '0,1,': an empty value"),
        (["zones", "--k", "4:1"], "--k '4:1': a range runs up, first to last (not 4 > 1)"),
        (["sweep", "--days", ""], "--days '' is empty"),
        (["sweep", "--days", "2016-01-13,,2016-01-14"], "an empty value in the list"),
        (["sweep", "--days", "2016-01-14:2016-01-13"], "a range runs up, first to last"),
        # a tender flag of another study would change nothing
        (["tender", "grid", "--n-nodes", "5"], "--n-nodes is for tender spatial or all, not"),
        (["tender", "optimum", "--k", "3"], "--k is for tender grid, not tender optimum"),
        (["tender", "--forecast-error", "0.2"], "--forecast-error is for tender grid, not"),
        (["tender", "grid", "--seeds", "1000000"], "seeds (--seeds): 1000000 asked; at most"),
        (["clear", "--market", "nodal", "--k", "3"], "nodal market clears one area per bus"),
        (["clear", "--market", "zonal"], "needs --k (or a --scenario with zones.k)"),
        # A key a flag set is reported against the flag, not the scenario file
        (
            ["zones", "--scenario", "cigre_mv_evening_peak", "--k", "0"],
            "error: --k: 'zones.k[0]' must be > 0",
        ),
        (
            ["clear", "--scenario", "cigre_mv_evening_peak", "--n-mtu", "2", "--k", "99"],
            "error: --k: 'zones.k' = 99 is out of range",
        ),
        (
            ["sweep", "--days", "2016-01-14", "--k", "99", "--workers", "0"],
            "error: --k: 'zones.k' = 99 is out of range",
        ),
        (  # a rule of two keys, one of them the flag's
            ["powerflow", "--scenario", "cigre_mv_evening_peak", "--vm-max-pu", "0.9"],
            "error: --vm-max-pu: 'grid.vm_min_pu' must be below 'grid.vm_max_pu' (0.9)",
        ),
    ],
)
def test_user_mistakes_give_one_line(capsys, argv, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["run", "ieee33_undervoltage", "--pricing", "pay_as_clear"],
            "lfm-zonal: error: run: unrecognized arguments: --pricing pay_as_clear "
            "(see lfm-zonal run --help)",
        ),
        (
            ["clear", "--market", "bogus"],
            "lfm-zonal: error: clear: argument --market: invalid choice: 'bogus' (choose from "
            "'nodal', 'zonal', 'needs_based') (see lfm-zonal clear --help)",
        ),
        (
            [],
            "lfm-zonal: error: the following arguments are required: COMMAND (see lfm-zonal --help)",
        ),
        (  # before the command: the top level's
            ["--bogus", "grids"],
            "lfm-zonal: error: unrecognized arguments: --bogus (see lfm-zonal --help)",
        ),
    ],
)
def test_an_argument_error_names_its_command_once(capsys, argv, expected):
    """An argument its command does not know is refused by that command (it was the top
    level's: "lfm-zonal: error: lfm-zonal: unrecognized arguments ... (see lfm-zonal
    --help)", for an argument of run)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == expected + "\n"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            '[grid]\nsource = "cigre_mv"\n[flexibility]\ncsv = "nope.csv"',
            "s.toml: 'flexibility.csv': resource file not found: data/nope.csv",
        ),
        (
            '[grid]\nsource = "cigre_mv"\n[profiles]\ncsv = "."',
            "s.toml: 'profiles.csv': profile file data is a folder, not a file",
        ),
        (
            '[grid]\nsource = "nope.json"',
            "s.toml: 'grid.source': grid file not found: data/nope.json",
        ),
        ('[grid]\nsource = "nosuchgrid"', "s.toml: 'grid.source': unknown grid 'nosuchgrid'"),
    ],
)
def test_a_file_a_scenario_names_is_refused_with_its_key(
    capsys, tmp_path, monkeypatch, section, expected
):
    """A file the scenario names that is not there is refused naming the scenario file and
    its key, at the path it was looked for (relative to the scenario's folder)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "s.toml").write_text(f'name = "s"\n{section}\n')
    code, _, err = run_cli(capsys, "run", "data/s.toml", "--out", "out")
    assert code == 2
    assert err.startswith(f"lfm-zonal: error: data/{expected}")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_verbose_goes_before_or_after_the_command(capsys):
    assert main(["grids", "-v"]) == 0 and main(["-v", "grids"]) == 0
    assert "cigre_mv" in capsys.readouterr().out


def test_zone_counts_read_the_same_way_on_every_command():
    """--k: a comma list, a range or repeated flags, the same counts on every command."""
    from lfm_zonal.cli import build_parser

    parser = build_parser()
    for command in (["zones"], ["clear"], ["sweep", "--days", "2016-01-14"], ["tender", "grid"]):
        for given in (["--k", "1,2,3"], ["--k", "1:3"], ["--k", "1", "--k", "2,3"]):
            assert parser.parse_args(command + given).k == (1, 2, 3), (command, given)


def test_zones_weigh_buses_by_the_resources_as_the_main_job(capsys, tmp_path):
    """`zones` weighs each bus by the flexible capacity of the scenario's resources, as `run`
    does (it took the grid's load and sgen peaks: other medoids, indices and errors)."""
    from lfm_zonal.study.job import prepare_base_case, prepare_resources

    out = tmp_path / "z"
    code, stdout, _ = run_cli(
        capsys, "zones", "--scenario", "ieee33_undervoltage", "--k", "2", "--out", str(out)
    )
    assert code == 0 and "weights capacity" in stdout
    capacity = prepare_resources(prepare_base_case(load_scenario("ieee33_undervoltage")))
    capacity = capacity.capacity_per_bus()
    zones = pd.read_csv(out / "zones.csv").set_index("bus")
    expected = capacity.reindex(zones.index).fillna(0.0).to_numpy()
    assert zones.weight_mw.to_numpy() == pytest.approx(expected, rel=1e-12)
    assert capacity.sum() > 0


def test_powerflow_where_no_mtu_converges_writes_nothing(capsys, tmp_path):
    """CIGRE MV with 30 times its loads: no MTU converges. The table would hold nothing
    but failures: refused (exit 2), its --out not written."""
    out = tmp_path / "pf.csv"
    argv = ["powerflow", "--grid", "cigre_mv", "--load-scale", "30", "--n-mtu", "2"]
    code, stdout, err = run_cli(capsys, *argv, "--out", str(out))
    assert code == 2
    assert "the AC power flow converges in none of the 2 MTU(s)" in err
    assert len(err.strip().splitlines()) == 1 and stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_malformed_json_grid(capsys, tmp_path):
    bad = tmp_path / "grid.json"
    bad.write_text("{ this is not json")
    code, _, err = run_cli(capsys, "powerflow", "--grid", str(bad))
    assert code == 2 and f"{bad}: not a readable pandapower JSON network" in err


def test_bad_profile_column_names_the_column(capsys, tmp_path):
    csv = tmp_path / "p.csv"
    pd.DataFrame({"load_999_p_mw": [1.0] * 4}).to_csv(csv, index=False)
    code, _, err = run_cli(capsys, "powerflow", "--n-mtu", "4", "--profiles", str(csv))
    assert code == 2 and "column 'load_999_p_mw': grid cigre_mv has no load 999" in err


def test_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lfm_zonal.cli", "powerflow", "--grid", "nowhere"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("lfm-zonal: error: --grid: 'grid.source': unknown grid 'nowhere'")
    assert "Traceback" not in proc.stderr


def test_sensitivities_command_writes_labelled_matrices(capsys, tmp_path):
    out = tmp_path / "sens"
    code, _, _ = run_cli(
        capsys,
        "sensitivities",
        "--grid",
        "ieee33",
        "--n-mtu",
        "4",
        "--mtu",
        "0",
        "--mtu",
        "2016-01-14 00:45",
        "--out",
        str(out),
    )
    assert code == 0
    vm_p = pd.read_csv(out / "mtu_0" / "vm_p.csv", index_col=0)
    assert list(vm_p.index) == list(range(33)) and list(vm_p.columns) == [str(b) for b in range(33)]
    # An MTU given by time is named by its number too (00:45: MTU 3 of 15-minute MTUs)
    assert sorted(p.name for p in out.glob("mtu_*")) == ["mtu_0", "mtu_3"]
    loading = pd.read_csv(out / "mtu_3" / "loading_p.csv", index_col=[0, 1])
    assert loading.index.names == ["element_type", "element"] and len(loading) == 32
    # Injecting at the feeder end raises its own voltage.
    assert vm_p.at[17, "17"] > 0


def test_a_solver_failure_gives_one_line_and_exit_code_1(capsys, tmp_path, monkeypatch):
    from lfm_zonal.market.lp import SolveStatus
    from lfm_zonal.market.strategies import ClearingModel

    monkeypatch.setattr(ClearingModel, "_run", lambda self: SolveStatus.INFEASIBLE)
    out = str(tmp_path / "results")
    code, _, err = run_cli(capsys, "run", "--out", out, "--quiet", "--workers", "1")
    assert code == 1
    assert err == "lfm-zonal: error: nodal market: DSO-needs LP: solver status Infeasible\n"
    assert not any(tmp_path.iterdir())  # no results folder
    # In worker processes, whichever market failed first is named.
    code, _, err = run_cli(capsys, "run", "--out", out, "--quiet", "--workers", "2")
    assert code == 1 and not any(tmp_path.iterdir())
    assert re.fullmatch(
        r"lfm-zonal: error: (nodal market|zonal and needs_based markets K = \d+): "
        r"DSO-needs LP: solver status Infeasible\n",
        err,
    )


def test_a_taken_out_is_refused_before_the_markets(capsys, tmp_path, monkeypatch):
    """run --out on a folder that is not empty: one line, exit code 2, once the inputs are
    accepted and before any market is cleared (on a big grid, minutes not lost); the folder
    is left as it was."""
    import lfm_zonal.study.job as job

    def no_market(*args, **kwargs):
        raise AssertionError("a market was cleared")

    monkeypatch.setattr(job, "clear_market", no_market)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    code, _, err = run_cli(capsys, "run", "--out", str(out))  # with progress lines
    assert code == 2
    assert err == (  # not "use --overwrite": that would not replace it either
        f"lfm-zonal: error: output folder {out} exists and is not empty (lfm-zonal did not "
        f"write it, no {MARKER} file in it: choose another --out)\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_run_writes_a_complete_folder_only(capsys, tmp_path):
    out = tmp_path / "results"
    code, stdout, _ = run_cli(capsys, "run", "--out", str(out), "--quiet")
    assert code == 0 and str(out) in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_case"]["mtus_with_overload"] > 0
    assert summary["reference_mtu"]["time"] == "2016-01-14 19:00:00"
    # Every market's needs are in needs.csv, the needs-based ones too: need_mwh is their sum.
    kpis, needs = pd.read_csv(out / "kpis.csv"), pd.read_csv(out / "needs.csv")
    dt_h = load_scenario("cigre_mv_evening_peak")["horizon"]["mtu_minutes"] / 60
    need_mwh = needs.groupby(["method", "k"]).need_mw.sum() * dt_h
    assert set(need_mwh.index) == set(zip(kpis.method, kpis.k, strict=True))
    for market in kpis.itertuples():
        assert need_mwh[(market.method, market.k)] == pytest.approx(market.need_mwh, abs=1e-6)
    # Refuses to overwrite, leaves the first result alone, and no partial folder is left behind.
    code, _, err = run_cli(capsys, "run", "--out", str(out), "--quiet")
    assert code == 2 and "exists and is not empty" in err
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_a_full_disk_gives_one_line_and_no_folder(capsys, tmp_path, monkeypatch):
    """A write that fails without naming a file (ENOSPC from a full disk): one line naming
    the results folder and the reason, exit 2, no folder left behind."""
    from conftest import small_scenario

    import lfm_zonal.study.results as results

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "write_csv", full_disk)
    out = tmp_path / "results"
    scenario = small_scenario(tmp_path, k="1", methods='"zonal"')
    code, _, err = run_cli(capsys, "run", str(scenario), "--out", str(out), "--quiet")
    assert code == 2
    assert err == (
        f"lfm-zonal: error: writing {out}: No space left on device; no results folder was written\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.toml"]


def test_a_swallowed_sigterm_still_stops_the_run(capsys, tmp_path, monkeypatch):
    """A SIGTERM whose exception a library swallowed (raised in logging's at-fork lock
    release, where Python ignores exceptions; found once in 90 tries by a user trial) still
    ends the command before its results folder is made final: exit 143, no folder."""
    import signal

    from conftest import small_scenario

    import lfm_zonal.study.results as results
    from lfm_zonal import progress

    drawn = results.plot_k_comparison

    def signalled_meanwhile(*args, **kwargs):
        progress.SIGNALLED.append(signal.SIGTERM)  # as the handler records it, then raises
        return drawn(*args, **kwargs)

    monkeypatch.setattr(results, "plot_k_comparison", signalled_meanwhile)
    scenario = small_scenario(tmp_path, k="1", methods='"zonal"')
    out = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", str(scenario), "--out", str(out), "--workers", "1")
    assert code == 143
    assert (
        err.strip().splitlines()[-1]
        == "lfm-zonal: terminated (SIGTERM); no results folder was written"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.toml"]
    assert progress.SIGNALLED == []


def test_an_oserror_that_is_not_the_disks_is_not_passed_off_as_one(capsys, tmp_path, monkeypatch):
    """Only storage errors (a full disk, a quota, a read-only or failing device) name no
    file and still get one line: out of memory or a bad descriptor is a bug to see."""
    import errno

    from conftest import small_scenario

    import lfm_zonal.study.results as results

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(results, "write_csv", no_memory)
    scenario = small_scenario(tmp_path, k="1", methods='"zonal"')
    with pytest.raises(OSError, match="Cannot allocate memory"):
        main(["run", str(scenario), "--out", str(tmp_path / "results"), "--quiet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.toml"]


@pytest.mark.slow
def test_run_is_deterministic(capsys, tmp_path):
    """Same scenario and seed, same bytes: every file, plots included; in kpis.csv all but the
    wall-clock timing columns."""
    from lfm_zonal.check.kpis import TIMING_COLUMNS

    for name in ("a", "b"):
        assert run_cli(capsys, "run", "--out", str(tmp_path / name), "--quiet")[0] == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) > 20
    for f in files:
        a, b = (tmp_path / "a" / f), (tmp_path / "b" / f)
        if f.name == "kpis.csv":
            ka, kb = (pd.read_csv(x).drop(columns=list(TIMING_COLUMNS)) for x in (a, b))
            pd.testing.assert_frame_equal(ka, kb, check_exact=True)
        else:
            assert a.read_bytes() == b.read_bytes(), f


def test_file_flags_are_relative_to_the_working_directory(tmp_path, monkeypatch, capsys):
    """--profiles with --scenario in another folder: the CSV is found where the user is,
    and it is used (the load it sets moves the base case)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "inputs").mkdir()
    (tmp_path / "sub" / "sc.toml").write_text(
        '[grid]\nsource = "ieee33"\n[horizon]\nstart = "2016-01-14 16:00"\nn_mtu = 1\n'
    )
    (tmp_path / "inputs" / "p.csv").write_text("time,load_1_p_mw\n2016-01-14 16:00,5.0\n")
    monkeypatch.chdir(tmp_path)
    argv = ["powerflow", "--scenario", "sub/sc.toml", "--out", "a.csv"]
    assert main(argv) == 0
    assert main([*argv[:-1], "b.csv", "--profiles", "inputs/p.csv"]) == 0
    capsys.readouterr()
    a, b = (pd.read_csv(tmp_path / f"{n}.csv") for n in "ab")
    assert b.loading_max_percent.iloc[0] > a.loading_max_percent.iloc[0] + 1


def test_a_nodal_market_alone_draws_no_comparison_against_k(capsys, tmp_path):
    """k_comparison.png compares zone counts: with the nodal market alone it was one dotted
    line in four panels, titled 'against the number of zones'. It is drawn, and the report
    shows it, where some market has zones."""
    from conftest import small_scenario

    for methods, drawn in (('"nodal"', False), ('"nodal", "zonal"', True)):
        scenario = small_scenario(tmp_path, k="2", methods=methods, name=f"{drawn}.toml")
        out = tmp_path / f"results_{drawn}"
        code, _, _ = run_cli(capsys, "run", str(scenario), "--out", str(out), "--quiet")
        assert code == 0
        assert (out / "k_comparison.png").is_file() is drawn
        assert ("k_comparison.png" in (out / "report.md").read_text()) is drawn
        assert (out / "before_after.png").is_file()


def test_a_report_writes_big_numbers_whole_and_tiny_ones_with_an_exponent():
    """report.md's tables: 4 significant digits, whole euros from 10,000 on (a user read
    1.14e+04 for 11,395.07 EUR), an exponent for a residual of 2e-05 p.u."""
    from lfm_zonal.study.report import report_number

    assert report_number(11395.07) == "11395" and report_number(-24445.4) == "-24445"
    assert report_number(8426.07) == "8426" and report_number(1.0018277) == "1.002"
    assert report_number(1.954e-05) == "1.954e-05" and report_number(float("nan")) == ""
    assert report_number(0.0) == "0" and report_number(3) == "3"


def test_clear_prints_the_voltage_left_beside_the_overload_left(capsys, tmp_path):
    """The table ``clear`` prints shows the residual voltage deviation too: on ieee33 the
    needs-based market at K = 2 leaves undervoltage (no overload, no new violation), which
    the table hid (a user read 0, 0 and thought it clean)."""
    code, out, _ = run_cli(
        capsys, "clear", "--grid", "ieee33", "--market", "needs_based", "--k", "2",
        "--n-mtu", "4", "--start", "2016-01-14 18:00", "--out", str(tmp_path / "c"),
    )  # fmt: skip
    assert code == 0
    header, row = out.splitlines()[:2]
    value = dict(zip(header.split(), row.split(), strict=True))
    assert float(value["residual_overload_max_percent"]) == 0.0
    assert float(value["residual_voltage_max_pu"]) > 0.0
    kpis = pd.read_csv(tmp_path / "c" / "kpis.csv")
    assert float(value["residual_voltage_max_pu"]) == pytest.approx(
        kpis.residual_voltage_max_pu.iloc[0], rel=1e-4
    )
