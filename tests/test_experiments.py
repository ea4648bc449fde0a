"""The experiments CLI and its shared reporting."""

import json
import statistics

import pytest

from pylux.experiments import EXPERIMENTS, main
from pylux.experiments._report import markdown_table, summarize


def test_summary_is_mean_and_sample_std_and_the_table_shows_both():
    runs = [{"acc": 90.0, "nfe": 20}, {"acc": 94.0, "nfe": 26}, {"acc": 95.0, "nfe": 32}]
    summary = summarize(runs, ["acc", "nfe"])
    assert summary["acc"] == (pytest.approx(93.0), pytest.approx(statistics.stdev([90.0, 94.0, 95.0])))
    assert summary["nfe"] == (pytest.approx(26.0), pytest.approx(6.0))
    table = markdown_table({"vanilla": summary}, (("acc", "acc (%)", "{:.1f}"), ("nfe", "NFE", "{:.0f}")))
    assert table.splitlines()[2] == "| vanilla | 93.0 ± 2.6 | 26 ± 6 |"
    assert summarize(runs[:1], ["acc"])["acc"] == (90.0, 0.0)


def test_cli_lists_and_runs_an_experiment(tmp_path, capsys):
    assert main(["experiments", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPERIMENTS) and len(EXPERIMENTS) >= 3
    assert main(["experiments", "node-spiral", "--iterations", "5", "--seeds", "2", "--methods", "vanilla",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    nfe = [run["predict_nfe"] for run in results["runs"]["vanilla"]]
    assert len(nfe) == 2 and all(n > 0 for n in nfe)
    assert results["summary"]["vanilla"]["predict_nfe"][0] == pytest.approx(statistics.fmean(nfe))
    assert "pylux experiments node-spiral --iterations 5 --seeds 2" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        main(["experiments", "no-such-experiment"])
