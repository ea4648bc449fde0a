"""benchmarks/stiff.py --quick end to end: the table's structure, exact per-step counters, pylux's errors against
the Radau reference (no timing assertions)."""

import contextlib
import importlib.util
import io
import pathlib

import pytest
import torch

PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "stiff.py"
TOL = 1e-4
PYLUX = ("pylux Rosenbrock23", "pylux Rodas5P", "pylux Kvaerno5", "pylux AutoSwitch", "pylux AutoSwitch(Rodas5P)",
         "pylux Rosenbrock23 + jac", "pylux Rodas5P + jac")
ROSENBROCK = ("pylux Rosenbrock23", "pylux Rodas5P", "pylux Rosenbrock23 + jac", "pylux Rodas5P + jac")
SCIPY = ("scipy BDF", "scipy Radau", "scipy LSODA")
PROBLEMS = ("robertson", "vdp mu=1000", "neural B=32 d=8")


def _load():
    spec = importlib.util.spec_from_file_location("bench_stiff", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick():
    bench = _load()
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rows, summary = bench.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    return bench, rows, summary, out.getvalue()


def test_quick_run_has_one_row_per_problem_and_method(quick):
    _, rows, _, _ = quick
    assert [(r["problem"], r["method"]) for r in rows] == [(p, m) for p in PROBLEMS for m in PYLUX + SCIPY]
    assert {r["tol"] for r in rows} == {TOL}


def test_printed_table_matches_the_rows(quick):
    _, rows, summary, text = quick
    lines = text.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("| problem | method |")))
    body = lines[head + 2:head + 2 + len(rows)]
    assert lines[head + 1].startswith("|---")
    for row, line in zip(rows, body):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 13
        assert cells[:3] == [row["problem"], row["method"], f"{TOL:.0e}"]
        assert int(cells[3]) == row["steps"] and int(cells[5]) == row["nfe"] and int(cells[6]) == row["njac"]
        assert float(cells[10]) == pytest.approx(row["error"], rel=1e-2)
    assert lines[head + 2 + len(rows)] == ""   # the table ends where the rows end
    assert "At equal error" in text and "load average" in text
    assert [s["problem"] for s in summary] == list(PROBLEMS)  # one error level per problem at one tolerance


def test_pylux_errors_are_within_ten_times_the_tolerance(quick):
    _, rows, _, _ = quick
    for r in rows:
        if r["method"].startswith("pylux"):
            assert 0.0 < r["error"] <= 10 * TOL, r


def test_rosenbrock_rows_factorise_once_per_trial_step(quick):
    _, rows, _, _ = quick
    for r in rows:
        if r["method"] in ROSENBROCK:
            assert r["nlu"] == r["steps"] + r["rejected"], r       # one LU per trial, its stages share it
            assert r["steps"] <= r["njac"] <= r["nlu"], r          # a retry from the same point reuses J
        if r["method"].startswith("pylux Rosenbrock23"):
            # FSAL: 2 f per trial; an autodiff dense Jacobian costs the forward pass its rows backpropagate
            # through (f_t from the same graph), a batched one also a difference in t, a user jac with the
            # user's tgrad none; 2 at the start (f(u0) and the initial step size heuristic)
            per_jacobian = 0 if "+ jac" in r["method"] else 2 if r["problem"] == PROBLEMS[2] else 1
            assert r["nfe"] == 2 * (r["steps"] + r["rejected"]) + per_jacobian * r["njac"] + 2, r


def test_step_counts_against_bdf_on_the_textbook_problems(quick):
    _, rows, _, _ = quick
    for r in rows:
        if r["method"] == "scipy BDF":
            assert r["time_vs_bdf"] == 1.0
        if r["problem"] != PROBLEMS[2] and r["method"] in PYLUX[:3]:
            assert r["steps_vs_bdf"] <= 2.0, r


def test_error_is_relative_with_the_problems_floor(quick):
    bench, _, _, _ = quick
    import numpy as np
    problem = {"ref": np.array([1.0, 0.0]), "floor": 1e-4}
    assert bench.error(np.array([1.0 + 2e-6, 1e-9]), problem) == pytest.approx(max(2e-6 / 1.0001, 1e-9 / 1e-4))


def test_unknown_problem_is_refused():
    bench = _load()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        bench.main(["--quick", "--problems", "robertson,brusselator"])
    assert "unknown problems ['brusselator']" in err.getvalue()


def test_methods_keeps_only_the_named_rows():
    bench = _load()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rows, summary = bench.main(["--quick", "--problems", "vdp", "--methods", "pylux Rodas5P, scipy LSODA"])
    finally:
        torch.set_num_threads(threads)
    assert [r["method"] for r in rows] == ["pylux Rodas5P", "scipy LSODA"]
    assert [s["scipy"]["method"] for s in summary] == ["scipy LSODA"]


def test_unknown_method_is_refused_with_the_choices():
    bench = _load()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        bench.main(["--quick", "--methods", "pylux Rodas5P compiled"])   # a compiled row needs --compile
    assert "unknown methods ['pylux Rodas5P compiled']" in err.getvalue() and "'scipy LSODA'" in err.getvalue()


def test_time_at_error_interpolates_the_work_precision_curve_log_log():
    bench = _load()
    runs = [dict(error=1e-4, ms=10.0), dict(error=1e-6, ms=40.0), dict(error=1e-8, ms=20.0)]
    assert bench.time_at_error(runs, 1e-9) is None                       # no run that accurate
    assert bench.time_at_error(runs, 1e-3) == 10.0                       # looser than every run: no extrapolation
    assert bench.time_at_error(runs, 1e-5) == pytest.approx(20.0)        # 1e-8's faster run beats the 10..40 curve
    assert bench.time_at_error(runs[:2], 1e-5) == pytest.approx(20.0)    # halfway in log error: sqrt(10 * 40)
    assert bench.time_at_error(runs[:2], 1e-4) == pytest.approx(10.0)


def test_interpolated_summary_takes_each_librarys_fastest_method(quick):
    bench, rows, summary, text = quick
    inter = bench.interpolated_equal_error(rows)
    assert [s["level"] for s in inter] == [s["level"] for s in summary]
    for s, grid in zip(inter, summary):
        assert s["scipy"][0] <= grid["scipy"]["ms"] and s["scipy"][1].startswith("scipy")
        if grid["pylux"] is not None:
            assert s["pylux"][0] <= grid["pylux"]["ms"] and s["ratio"] == pytest.approx(s["pylux"][0] / s["scipy"][0])
    assert "On the work-precision curves" in text
