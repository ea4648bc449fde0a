"""The example notebooks execute top to bottom (their cells check their own results); short reprs."""

import os
import pathlib
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
from make_notebooks import NOTEBOOKS, build  # noqa: E402

try:
    import nbclient
    import nbformat
    import ipykernel  # noqa: F401  (the python3 kernel nbclient starts)
except ImportError as error:  # the test extra brings them: pip install -e ".[test]"
    nbclient = None
    MISSING = f"executing notebooks needs nbclient, nbformat and ipykernel (pip install -e \".[test]\"): {error}"


def test_every_notebook_in_examples_is_generated_and_stored_without_outputs():
    if nbclient is None:
        pytest.skip(MISSING)
    on_disk = {path.name for path in EXAMPLES.glob("*.ipynb")}
    assert on_disk == set(NOTEBOOKS), "regenerate them with: python examples/make_notebooks.py"
    for name, cells in NOTEBOOKS.items():
        stored = nbformat.read(EXAMPLES / name, as_version=4)
        assert [c.source for c in stored.cells] == [c.source for c in build(cells).cells], name
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in stored.cells if c.cell_type == "code"), f"{name} is stored with outputs"


@pytest.fixture(scope="module")
def kernel():
    """One python3 kernel of this interpreter (the venv's, importing this checkout) for every notebook.

    Starting a kernel and importing torch is most of a small notebook's time, so
    the notebooks share one kernel; each starts from an empty namespace (``%reset``).
    """
    if nbclient is None:
        pytest.skip(MISSING)
    from jupyter_client.manager import KernelManager
    manager = KernelManager(kernel_name="python3")
    manager.kernel_spec.argv[0] = sys.executable
    manager.kernel_spec.env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jupyter_client's own, about its paths
        manager.start_kernel()
    yield manager
    manager.shutdown_kernel(now=True)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes(name, kernel, tmp_path):
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(f"%reset -f\nimport os; os.chdir({str(tmp_path)!r})"))
    nbclient.NotebookClient(notebook, km=kernel, timeout=300).execute()
    outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "IProgress not found" not in stderr  # no warning from the progress bars when ipywidgets is absent
    if name in ("neural_ode_classifier.ipynb", "spiral_fit.ipynb"):  # the plots are drawn inline
        assert any("image/png" in o.get("data", {}) for o in outputs)


def test_history_repr_is_a_short_summary():
    from pylux.training import History
    history = History({"step": k, "epoch": 1 + k // 300, "loss": 1.0 / (k + 1), "nfe": 26, "grad_norm": 0.5}
                      for k in range(3000))
    history.epochs = [{"epoch": e, "step": 300 * e, "loss": 0.1 / e, "time": 1.5 * e} for e in range(1, 11)]
    text = repr(history)
    assert len(text) < 200, text  # the list repr of these records runs to about 230 000 characters
    assert text.startswith("History(3000 steps; 10 epochs; last step: loss=0.0003333, nfe=26, grad_norm=0.5")
    assert str(history) == text and repr(History()) == "History(0 steps; 0 epochs)"
    assert len(list(history)) == 3000 and history.keys() == ["step", "epoch", "loss", "nfe", "grad_norm"]


def test_history_plot_writes_a_png_and_names_missing_keys(tmp_path):
    pytest.importorskip("matplotlib")
    from pylux.training import History
    history = History({"step": k + 1, "epoch": 1, "loss": 2.0 / (k + 1), "nfe": 20 + k} for k in range(5))
    path = history.plot(str(tmp_path / "h.png"), ("loss", "nfe", "absent"))
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("h.png")
    with pytest.raises(ValueError, match=r"none of \['absent'\] is in the records; recorded keys: \['step'"):
        history.plot(str(tmp_path / "x.png"), ("absent",))


def test_progress_bar_is_a_widget_only_in_a_kernel_with_ipywidgets(monkeypatch):
    import importlib.util
    import types

    from pylux.training import progress_bar
    real_find_spec = importlib.util.find_spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # choosing warns nothing (tqdm.auto warns in a kernel without ipywidgets)
        assert type(progress_bar(total=2, disable=True)).__module__ == "tqdm.std"  # not in a kernel
        monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("zmqshell"))
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *rest: None if name == "ipywidgets" else real_find_spec(name, *rest))
        assert type(progress_bar(total=2, disable=True)).__module__ == "tqdm.std"  # a kernel, no ipywidgets
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    pytest.importorskip("ipywidgets")
    assert type(progress_bar(total=2, disable=True)).__module__ == "tqdm.notebook"
