"""README's main command: examples/quickstart.py trains a neural ODE on the digits (here at reduced size)."""

import pathlib
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_main_command_runs_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- main-command -->", 1)[1].split("```", 2)[1]
    assert "pip install -e ." in block and "python examples/quickstart.py" in block


def test_quickstart_trains_a_neural_ode_and_writes_the_plot(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="quickstart")["main"]
    result = main(["--epochs", "2", "--out", str(tmp_path)])
    # two epochs already beat a 10-class guess by far (about 95% after the default 15)
    assert result["test_accuracy"] > 0.8
    assert isinstance(result["test_nfe"], int) and result["test_nfe"] > 0
    history = result["history"]
    assert len(history) == 2 * 23 and all(record["nfe"] > 0 for record in history)
    plot = pathlib.Path(result["plot"])
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "test NFE:" in out and f"wrote {plot}" in out
    assert str(history).startswith("History(46 steps; 2 epochs")


def test_readme_quickstart_snippets_run(capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```python\n")[1:]]
    assert len(blocks) == 3  # the neural ODE, the Skip DEQ, the pieces underneath
    namespace: dict = {}
    for block in blocks:  # the blocks build on each other, as a reader runs them
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["history"].epochs and namespace["ts"].st["deq"]["solution"].converged
    out = capsys.readouterr().out
    assert "History(69 steps; 3 epochs" in out and "History(24 steps; 2 epochs" in out
