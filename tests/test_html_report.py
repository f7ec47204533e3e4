"""`adamerge-report` and notebooks/results.ipynb on one real comparison run of the reduced demo zoo."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from adamerge.errors import ConfigError
from adamerge.reporting.html import main, write_report
from adamerge.reporting.plots import PNG_SIGNATURE
from tests.test_cli import adamerge

METHODS = ["pretrained", "task_arithmetic", "adamerging_task_wise", "adamerging_layer_wise"]
LEARNED = ["adamerging_task_wise", "adamerging_layer_wise"]
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "results.ipynb"


@pytest.fixture(scope="module")
def run(zoo, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    adamerge(run_dir, zoo, f"method.methods=[{','.join(METHODS)}]", "trainer.max_steps=3", "logger=none")
    return run_dir


@pytest.fixture(scope="module")
def sweep(run, tmp_path_factory) -> Path:
    """A sweep directory in the sweep_summary.json format (a format test: the jobs are the real run's method
    directories copied under job names, the summary is written here, one job failed)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    rows = []
    for index, (method, lr) in enumerate((("adamerging_task_wise", "0.01"), ("task_arithmetic", None))):
        job = f"{index}_{method}"
        shutil.copytree(run / method, sweep_dir / job)
        result = json.loads((run / method / "results.json").read_text())
        overrides = {"trainer.max_steps": "3", "method": method, **({"method.lr": lr} if lr else {})}
        rows.append({"job": job, "job_dir": job, "overrides": overrides,
                     "method": method, "status": "ok", "error": None, "objective_name": "information_maximization",
                     "objective": -0.4321, "entropy": 0.2468, "average_accuracy": result["average_accuracy"],
                     "accuracy": result["accuracy"], "seconds": result["seconds"],
                     "peak_memory_mb": result["peak_memory_mb"]})
    rows.append({"job": "2_adamerging_layer_wise", "job_dir": "2_adamerging_layer_wise",
                 "overrides": {"trainer.max_steps": "3", "method": "adamerging_layer_wise", "method.lr": "9.0"},
                 "method": "adamerging_layer_wise", "status": "failed",
                 "error": "NonFiniteError: the objective of task digits is nan at step 2",
                 "objective_name": None, "objective": None, "entropy": None, "average_accuracy": None, "accuracy": {},
                 "seconds": None, "peak_memory_mb": None})
    shutil.copy(run / "adamerging_task_wise" / "coefficients.png", sweep_dir / "sweep_method.lr.png")
    summary = {"sweep_dir": str(sweep_dir), "tasks": result["tasks"], "swept": ["method", "method.lr"],
               "selection": {"criterion": "objective", "description": "lowest final objective (task mean)",
                             "label_free_pick": 0, "accuracy_pick": 1, "cost_of_not_peeking": 0.0123,
                             "note": "one job failed and was not considered"},
               "rows": rows, "plots": {"method.lr": "sweep_method.lr.png"}}
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary))
    return sweep_dir


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data, validate=True) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def table_row(page: str, first_cell: str) -> list[str]:
    """The cells (tags stripped) of the first table row that starts with ``first_cell``."""
    row = re.search(rf"<tr[^>]*><td>{re.escape(first_cell)}</td>(.*?)</tr>", page).group(1)
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    assert re.findall(r'src="([^"]{0,22})', page) == ["data:image/png;base64,"] * page.count('src="')
    assert all(png.startswith(PNG_SIGNATURE) and len(png) > 1000 for png in embedded_pngs(page))
    # Every table scrolls inside its own box (many tasks make wide tables), not cut at the page's edge.
    assert page.count("<table>") == page.count('<div class="table-scroll"><table>') > 0
    assert ".table-scroll { overflow-x: auto;" in page


def test_report_of_a_comparison_run_shows_every_result_and_figure(run, capsys):
    assert main([str(run)]) == 0
    path = run / "report.html"
    assert capsys.readouterr().out.strip() == str(path) and oct(path.stat().st_mode & 0o777) == "0o644"
    page = path.read_text()
    assert_self_contained(page)
    # One accuracy chart, and a heatmap plus an objective/entropy figure per learned method.
    assert len(embedded_pngs(page)) == 1 + 2 * len(LEARNED)
    tasks = json.loads((run / "summary.json").read_text())["tasks"]
    results = {m: json.loads((run / m / "results.json").read_text()) for m in METHODS}
    best = {t: max(r["accuracy"][t] for r in results.values()) for t in tasks}
    for method, result in results.items():
        cells = table_row(page, method)
        expected = [f"{100 * result['accuracy'][t]:.1f}" for t in tasks] + [f"{100 * result['average_accuracy']:.1f}"]
        assert [re.sub("</?b>", "", c) for c in cells] == [*expected, f"{result['seconds']:.1f}",
                                                          f"{result['peak_memory_mb']:.0f}"]
        assert [c.startswith("<b>") for c in cells[:len(tasks)]] == [result["accuracy"][t] == best[t] for t in tasks]
        for task in tasks:
            assert f"{result['unlabeled']['entropy'][task]:.4f}" in page
    for method in LEARNED:
        result = results[method]
        section = page[page.index(f"<h3>{method}</h3>"):]  # its first label-free and profile tables are its own
        assert f"{method}: merge coefficients" in section and f"{method}: objective and entropy per step" in section
        for task, signals in result["label_free"].items():
            assert table_row(section, task)[:5] == [
                f"{signals['objective_start']:.4f}", f"{signals['objective_end']:.4f}",
                f"{signals['objective_end'] - signals['objective_start']:.4f}",
                f"{100 * signals['prediction_changed']:.1f}", f"{100 * result['start_accuracy'][task]:.1f}"]
        for phase, timing in result["profile"].items():
            assert table_row(section, phase) == [f"{timing['ms_per_step']:.1f}", f"{100 * timing['fraction']:.1f}",
                                                 f"{timing['seconds']:.2f}"]
    assert "<h3>pretrained</h3>" not in page  # data-free methods get no learned-method section

    # The report re-plots from the results, so it survives the run directory moving (the heatmap PNG gone).
    (run / "adamerging_layer_wise" / "coefficients.png").rename(run / "coefficients.moved")
    try:
        assert len(embedded_pngs(write_report(run, run / "moved.html").read_text())) == 1 + 2 * len(LEARNED)
    finally:
        (run / "coefficients.moved").rename(run / "adamerging_layer_wise" / "coefficients.png")


def test_report_of_a_single_method_run(run, tmp_path):
    # A comparison's method directory holds results.json alone: the layout of a single-method run.
    output = tmp_path / "single.html"
    assert main([str(run / "adamerging_task_wise"), "-o", str(output)]) == 0
    page = output.read_text()
    assert_self_contained(page)
    assert len(embedded_pngs(page)) == 3  # accuracy, heatmap, curves
    result = json.loads((run / "adamerging_task_wise" / "results.json").read_text())
    average = table_row(page, "adamerging_task_wise")[len(result["tasks"])]
    assert average == f"<b>{100 * result['average_accuracy']:.1f}</b>"  # the only row is the best
    assert "task_arithmetic" not in page and "pretrained" not in page
    assert not (run / "adamerging_task_wise" / "report.html").exists()


def test_report_of_a_sweep_marks_both_picks_and_the_failed_job(sweep):
    """Format test on a hand-written sweep_summary.json (the jobs are real run directories)."""
    page = write_report(sweep).read_text()
    assert_self_contained(page)
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    # The sweep plot, then job 0 (accuracy, heatmap, curves) and job 1 (accuracy: data-free); none for the failed job.
    assert len(embedded_pngs(page)) == 1 + 3 + 1
    assert embedded_pngs(page)[0] == (sweep / "sweep_method.lr.png").read_bytes()
    cells = table_row(page, '0_adamerging_task_wise <span class="pick">label-free pick</span>')
    ok = summary["rows"][0]
    assert cells[:5] == ["method=adamerging_task_wise method.lr=0.01", "adamerging_task_wise", "ok", "-0.4321",
                         "0.2468"]
    assert re.sub("</?b>", "", cells[5]) == f"{100 * ok['average_accuracy']:.1f}"
    assert '1_task_arithmetic <span class="pick">accuracy pick</span>' in page
    failed = table_row(page, "2_adamerging_layer_wise")
    assert failed == ["method=adamerging_layer_wise method.lr=9.0", "adamerging_layer_wise", "failed",
                      "NonFiniteError: the objective of task digits is nan at step 2"]
    assert '<tr class="failed">' in page and "overrides of every job: <code>trainer.max_steps=3</code>" in page
    assert "<b>label-free pick</b>: 0_adamerging_task_wise" in page
    assert "<b>test accuracy would pick</b>: 1_task_arithmetic" in page
    assert "1.2 percentage points" in page and "one job failed and was not considered" in page
    assert "<h3>2_adamerging_layer_wise</h3>" not in page


def test_a_sweep_killed_before_its_summary_gets_one_built(tmp_path):
    job = tmp_path / "sweep" / "0_task_arithmetic"
    (job / ".hydra").mkdir(parents=True)
    page = write_report(tmp_path / "sweep").read_text()
    assert (tmp_path / "sweep" / "sweep_summary.json").exists() and "0_task_arithmetic" in page
    assert "killed" in page  # the job without results is a failed row, not silently absent


@pytest.mark.parametrize(("make", "expected"), [
    (lambda tmp: tmp / "nowhere", "is not a directory"),
    (lambda tmp: tmp, "holds none of summary.json or results.json (a run) or sweep_summary.json"),
], ids=["missing", "empty"])
def test_bad_directories_fail_with_one_line_naming_the_path(tmp_path, capsys, make, expected):
    directory = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main([str(directory)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert str(directory) in captured.err and expected in captured.err
    assert sorted(tmp_path.rglob("*")) == before  # no report, no temporary file
    with pytest.raises(ConfigError, match=re.escape(str(directory))):
        write_report(directory)


def test_module_entry_point_exits_2_on_a_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, "-m", "adamerge.reporting.html", str(missing)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and str(missing) in result.stderr and "Traceback" not in result.stderr


def test_stored_notebook_is_valid_and_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_notebook_runs_headless_on_a_run_and_a_sweep(request, kind, tmp_path, monkeypatch):
    directory = request.getfixturevalue(kind)
    # A kernel spec naming this interpreter: `python3` may resolve to another environment's Python on a machine
    # with user-level kernels, and the notebook imports adamerge.
    spec = tmp_path / "kernels" / "adamerge-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "adamerge test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # searched before every other kernel directory
    monkeypatch.setenv("ADAMERGE_RUN_DIR", str(directory))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="adamerge-test",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
                      if output.output_type == "stream" and output.name == "stdout")
    assert str(directory) in printed
    if kind == "run":
        assert all(f"\n{method} " in printed for method in METHODS)
        assert f"{len(LEARNED)} learned method(s) with coefficients" in printed
        assert "not a sweep directory" in printed
    else:
        assert "0_adamerging_task_wise" in printed and "<- label-free pick" in printed and "<- accuracy pick" in printed
        assert "error: NonFiniteError" in printed and "cost of not peeking: 1.2 points" in printed
        assert "1 learned method(s) with coefficients" in printed
