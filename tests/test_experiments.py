"""The experiments CLI: one grammar for every experiment, the shared reporting, and smoke runs."""

import argparse
import json
import statistics

import pytest

from pylux.experiments import EXPERIMENTS, main
from pylux.experiments._report import (add_common_arguments, markdown_table, paper_comparison, parse_methods,
                                       plot_histories, summarize)

PNG = b"\x89PNG\r\n\x1a\n"


def test_summary_is_mean_and_sample_std_and_the_table_shows_both():
    runs = [{"acc": 90.0, "nfe": 20}, {"acc": 94.0, "nfe": 26}, {"acc": 95.0, "nfe": 32}]
    summary = summarize(runs, ["acc", "nfe"])
    assert summary["acc"] == (pytest.approx(93.0), pytest.approx(statistics.stdev([90.0, 94.0, 95.0])))
    assert summary["nfe"] == (pytest.approx(26.0), pytest.approx(6.0))
    table = markdown_table({"vanilla": summary}, (("acc", "acc (%)", "{:.1f}"), ("nfe", "NFE", "{:.0f}")))
    assert table.splitlines()[2] == "| vanilla | 93.0 ± 2.6 | 26 ± 6 |"
    assert summarize(runs[:1], ["acc"])["acc"] == (90.0, 0.0)


def test_paper_comparison_states_the_paper_beside_our_ratio_and_the_direction():
    summary = {"vanilla": {"nfe": (100.0, 5.0), "acc": (90.0, 1.0)}, "ernode": {"nfe": (60.0, 4.0), "acc": (89.0, 1.0)},
               "srnode": {"nfe": (110.0, 3.0), "acc": (91.0, 1.0)}}
    claims = [{"method": m, "baseline": "vanilla", "metric": "nfe", "label": "test NFE", "paper": "0.5x",
               "direction": "lower", "source": "Pal et al. 2021"} for m in ("ernode", "srnode", "steer")]
    claims.append({"method": "srnode", "baseline": "vanilla", "metric": "acc", "label": "accuracy", "paper": "same",
                   "direction": "higher", "source": "elsewhere"})
    text, records = paper_comparison(summary, claims)
    assert [(r["method"], r["metric"]) for r in records] == [("ernode", "nfe"), ("srnode", "nfe"), ("srnode", "acc")]
    assert [r["ratio"] for r in records] == pytest.approx([0.6, 1.1, 91 / 90])
    assert [r["reproduced"] for r in records] == [True, False, True]
    rows = text.splitlines()
    assert rows[2] == "| ernode | vanilla | test NFE (lower) | 0.5x | 0.60x | yes | [1] |"
    assert rows[3] == "| srnode | vanilla | test NFE (lower) | 0.5x | 1.10x | no | [1] |"
    assert rows[4].endswith("| yes | [2] |") and "[1] Pal et al. 2021" in text and "[2] elsewhere" in text
    assert paper_comparison({"vanilla": summary["vanilla"]}, claims) == ("", [])
    with pytest.raises(ValueError, match="direction"):
        paper_comparison(summary, [{**claims[0], "direction": "down"}])


def test_common_grammar_and_method_lists():
    parser = argparse.ArgumentParser()
    add_common_arguments(parser, ("a", "b", "c"), quick="1 seed")
    args = parser.parse_args([])
    assert (args.seeds, args.methods, args.quick, args.threads) == (3, "a,b,c", False, 1)
    assert parse_methods(" c, a,c ", ("a", "b", "c"), "demo") == ["c", "a"]
    with pytest.raises(ValueError, match=r"demo: unknown method\(s\) 'd'; choose from a, b, c"):
        parse_methods("a,d", ("a", "b", "c"), "demo")
    with pytest.raises(ValueError, match="names no method"):
        parse_methods(" , ", ("a",), "demo")


def test_plot_histories_keeps_the_old_call_and_draws_bands_and_a_regularization_panel(tmp_path):
    pytest.importorskip("matplotlib")
    old = {"vanilla": [{"loss": [3.0, 2.0, 1.0], "nfe": [20, 26, 26]}, {"loss": [3.5, 2.5, 1.5], "nfe": [20, 20, 26]}]}
    assert plot_histories(old, str(tmp_path / "old.png"), "old call") == str(tmp_path / "old.png")
    new = {m: [{"loss": [3.0, 2.0], "data_loss": [2.5, 1.8], "reg": [0.5, 0.2], "nfe": [20, 14]}] for m in ("a", "b")}
    path = plot_histories(new, str(tmp_path / "new.png"), "new keys", x_label="epoch")
    assert (tmp_path / "new.png").read_bytes()[:8] == PNG and path.endswith("new.png")


def _cli(name, tmp_path, *extra):
    assert main(["experiments", name, *extra, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "results.json").read_text()), (tmp_path / "results.md").read_text()


def test_cli_lists_and_runs_an_experiment(tmp_path, capsys):
    assert main(["experiments", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPERIMENTS) and len(EXPERIMENTS) >= 3
    results, text = _cli("node-spiral", tmp_path, "--iterations", "5", "--seeds", "2", "--methods", "vanilla,ernode")
    nfe = [run["predict_nfe"] for run in results["runs"]["vanilla"]]
    assert len(nfe) == 2 and all(n > 0 for n in nfe)
    assert results["summary"]["vanilla"]["predict_nfe"][0] == pytest.approx(statistics.fmean(nfe))
    assert "pylux experiments node-spiral --iterations 5 --seeds 2" in text
    # the paper's claim beside our ratio of means, and the verdict
    (check,) = [c for c in results["paper_comparison"] if c["metric"] == "predict_nfe"]
    ernode = statistics.fmean(run["predict_nfe"] for run in results["runs"]["ernode"])
    assert check["ratio"] == pytest.approx(ernode / statistics.fmean(nfe))
    assert check["reproduced"] == (check["ratio"] < 1)
    row = f"| ernode | vanilla | prediction NFE (lower) | fewer (the cause of the time) | {check['ratio']:.2f}x"
    assert row in text
    # the data loss and the regularization term are recorded apart: loss = data loss + reg
    history = results["histories"]["ernode"][0]
    assert [d + r for d, r in zip(history["data_loss"], history["reg"])] == pytest.approx(history["loss"], rel=1e-5)
    assert all(r > 0 for r in history["reg"]) and not any(results["histories"]["vanilla"][0]["reg"])
    # the fitted trajectory is saved and plotted against the data
    fit = results["fits"]["vanilla"][0]
    assert len(fit) == len(results["data"]["t"]) == 30 and len(fit[0]) == 2
    assert fit[0] == pytest.approx(results["data"]["u"][0], abs=1e-6)  # the fit starts at the observed u(0)
    assert (tmp_path / "fit.png").read_bytes()[:8] == PNG and (tmp_path / "training.png").read_bytes()[:8] == PNG
    assert f"wrote {tmp_path}: results.md, results.json, training.png, fit.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["experiments", "no-such-experiment"])


@pytest.mark.parametrize("name", ["node-spiral", "node-digits", "deq-digits"])
def test_every_experiment_rejects_bad_methods_and_seeds(name, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        main(["experiments", name, "--methods", "no-such-method", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--seeds is the number of seeds"):
        main(["experiments", name, "--seeds", "0", "--out", str(tmp_path)])


def test_node_digits_quick_smoke_run(tmp_path):
    results, text = _cli("node-digits", tmp_path, "--quick", "--methods", "vanilla,local-biased")
    assert results["settings"]["seeds"] == 1 and results["settings"]["epochs"] == 1
    assert set(results["summary"]) == {"vanilla", "local-biased"}
    assert all(run["test_accuracy"] > 15 for runs in results["runs"].values() for run in runs)  # above chance
    assert {c["metric"] for c in results["paper_comparison"]} == {"test_nfe", "predict_time_s"}
    assert "0.556x-0.733x" in text and "Pal et al. 2023" in text
    history = results["histories"]["local-biased"][0]
    assert len(history["data_loss"]) == len(history["reg"]) == len(history["nfe"]) == 3  # 1437 images / 512


def test_deq_digits_grammar_summary_and_paper_comparison(tmp_path):
    results, text = _cli("deq-digits", tmp_path, "--epochs", "2", "--seeds", "2", "--hidden", "16",
                         "--methods", "vanilla-discrete,skipreg-discrete")
    summary = results["summary"]
    for variant in ("vanilla-discrete", "skipreg-discrete"):
        accuracies = [run["test_accuracy"] for run in results["runs"][variant]]
        assert [run["seed"] for run in results["runs"][variant]] == [0, 1]
        assert summary[variant]["test_accuracy"][0] == pytest.approx(statistics.fmean(accuracies))
        assert summary[variant]["test_accuracy"][1] == pytest.approx(statistics.stdev(accuracies))
        assert min(accuracies) > 30.0  # well above the 10% of chance after two epochs
    ratio = summary["skipreg-discrete"]["test_nfe"][0] / summary["vanilla-discrete"]["test_nfe"][0]
    assert results["nfe_ratios"]["skipreg-discrete"] == pytest.approx(ratio)
    assert {c["metric"] for c in results["paper_comparison"]} == {"train_time_s", "predict_time_s", "test_nfe"}
    assert "| skipreg-discrete |" in text and "2.5x faster" in text
    history = results["histories"]["skipreg-discrete"][0]
    assert history["epoch"] == [1, 2] and all(r > 0 for r in history["reg"])  # the skip loss, kept apart
    assert (tmp_path / "training.png").read_bytes()[:8] == PNG
