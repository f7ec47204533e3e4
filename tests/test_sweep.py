"""Sweep summaries, label-free selection, wandb grouping and the Optuna search."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from adamerge.reporting.html import write_report
from adamerge.reporting.selection import get_criterion, pick, pick_by_accuracy
from adamerge.reporting.sweep import ERROR_FILE, job_score, main as sweep_main, summarize, write_summary_files
from adamerge.reporting.sweep_plots import log_axis, log_spaced
from tests.helpers import wandb_records
from tests.test_cli import adamerge

TASKS = ["digits", "photos"]
PNG = b"\x89PNG\r\n\x1a\n"


def result(method: str, accuracy: list[float], objective: list[float | None], entropy: list[float],
           objective_name: str = "information_maximization") -> dict:
    return {"method": method, "tasks": TASKS, "accuracy": dict(zip(TASKS, accuracy)),
            "average_accuracy": sum(accuracy) / len(accuracy), "seconds": 1.5, "peak_memory_mb": 700.0,
            "objective": {"name": objective_name, "normalize": False},
            "unlabeled": {"objective": dict(zip(TASKS, objective)), "entropy": dict(zip(TASKS, entropy))}}


def make_job(sweep: Path, name: str, overrides: list[str], results: dict[str, dict] | None = None,
             error: dict | None = None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    results = results or {}
    if len(results) == 1:
        (job / "results.json").write_text(json.dumps(next(iter(results.values()))))
    else:
        for method, payload in results.items():
            (job / method).mkdir()
            (job / method / "results.json").write_text(json.dumps(payload))
        if results:
            rows = [{"method": m} for m in results]
            (job / "summary.json").write_text(json.dumps({"tasks": TASKS, "rows": rows}))
    if error:
        (job / ERROR_FILE).write_text(json.dumps(error))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Four finished jobs over method.lr (one a comparison holding `individual`), one failed, one killed.

    The lowest objective (lr=0.1) is not the highest accuracy (lr=0.01), and `individual` has both the
    lowest objective and the highest accuracy but is no single merged model."""
    sweep = tmp_path / "sweep"
    lw = "adamerging_layer_wise"
    make_job(sweep, "0_lw", [f"method={lw}", "method.lr=0.001", "seed=0"],
             {lw: result(lw, [0.50, 0.60], [-0.40, -0.50], [0.30, 0.40])})
    make_job(sweep, "1_lw", [f"method={lw}", "method.lr=0.01", "seed=0"],
             {lw: result(lw, [0.70, 0.80], [-0.60, -0.70], [0.20, 0.30])})
    make_job(sweep, "2_lw", [f"method={lw}", "method.lr=0.1", "seed=0"],
             {lw: result(lw, [0.60, 0.70], [-0.90, -0.80], [0.10, 0.20])})
    make_job(sweep, "3_compare", ["method.lr=1.0", "seed=0"],
             {"individual": result("individual", [0.95, 0.95], [-2.0, -2.0], [0.0, 0.0]),
              "task_arithmetic": result("task_arithmetic", [0.55, 0.55], [-0.30, float("nan")], [0.5, 0.5])})
    make_job(sweep, "4_lw", [f"method={lw}", "method.lr=-1", "seed=0"],
             error={"method": lw, "type": "ConfigError", "message": "hyperparameter lr=-1 is invalid"})
    make_job(sweep, "10_lw", [f"method={lw}", "method.lr=0.5", "seed=0"])  # killed: nothing written
    return sweep


def test_summary_has_one_row_per_method_and_job_with_failed_rows(sweep):
    summary = write_summary_files(sweep)
    rows = summary["rows"]
    assert [(r["job"], r["method"], r["status"]) for r in rows] == [
        ("0_lw", "adamerging_layer_wise", "ok"), ("1_lw", "adamerging_layer_wise", "ok"),
        ("2_lw", "adamerging_layer_wise", "ok"), ("3_compare", "individual", "ok"),
        ("3_compare", "task_arithmetic", "ok"), ("4_lw", "adamerging_layer_wise", "failed"), ("10_lw", None, "failed"),
    ]  # job-number order: 10 after 4
    assert summary["swept"] == ["method", "method.lr"] and summary["tasks"] == TASKS
    assert rows[0]["overrides"]["method.lr"] == "0.001"
    assert rows[2]["objective"] == pytest.approx(-0.85) and rows[2]["entropy"] == pytest.approx(0.15)
    assert rows[2]["average_accuracy"] == pytest.approx(0.65) and rows[2]["accuracy"] == {"digits": 0.6, "photos": 0.7}
    assert rows[4]["objective"] is None  # a non-finite task score makes the mean unusable, not NaN in JSON
    assert "lr=-1 is invalid" in rows[5]["error"] and "killed" in rows[6]["error"]

    saved = json.loads((sweep / "sweep_summary.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["plots"] == {
        "method": "sweep_method.png", "method.lr": "sweep_method.lr.png"}
    for name in saved["plots"].values():
        assert (sweep / name).read_bytes()[:8] == PNG
    table = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [row["status"] for row in table] == ["ok"] * 5 + ["failed"] * 2
    assert table[2]["objective"] == "-0.8500" and table[2]["accuracy/photos"] == "70.00" and table[2]["method.lr"] == "0.1"
    assert "lr=-1 is invalid" in table[5]["error"]
    markdown = (sweep / "sweep_summary.md").read_text()
    assert "| 2_lw | adamerging_layer_wise | 0.1 |" in markdown and "## Failed jobs" in markdown


def test_label_free_pick_and_what_test_accuracy_would_have_picked(sweep):
    summary = summarize(sweep)
    selection = summary["selection"]
    # Lowest task-mean objective among merges: job 2 (-0.85); `individual` (-2.0) is K models, never a pick.
    assert summary["rows"][selection["label_free_pick"]]["job"] == "2_lw"
    assert summary["rows"][selection["accuracy_pick"]]["job"] == "1_lw"
    assert selection["cost_of_not_peeking"] == pytest.approx(0.75 - 0.65)
    from adamerge.reporting.sweep import to_markdown
    markdown = to_markdown(summary)
    assert "| label-free pick |" in markdown and "| test-accuracy pick |" in markdown
    assert "not peeking at the labels cost 10.00 points" in markdown

    by_entropy = summarize(sweep, "entropy")["selection"]
    assert by_entropy["criterion"] == "entropy" and summary["rows"][by_entropy["label_free_pick"]]["job"] == "2_lw"


def test_objective_values_of_different_objectives_are_not_compared(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, "0_a", ["objective=entropy"], {"a": result("a", [0.5, 0.5], [0.1, 0.1], [0.1, 0.1], "entropy")})
    make_job(sweep, "1_a", ["objective=information_maximization"],
             {"a": result("a", [0.6, 0.6], [-0.5, -0.5], [0.3, 0.3])})
    selection = summarize(sweep)["selection"]
    assert selection["label_free_pick"] is None and "different objectives" in selection["note"]
    assert selection["accuracy_pick"] == 1
    assert summarize(sweep, "entropy")["selection"]["label_free_pick"] == 0


def test_job_score_is_the_picked_methods_objective():
    rows = [result("individual", [0.9, 0.9], [-3.0, -3.0], [0.0, 0.0]),
            result("task_arithmetic", [0.5, 0.5], [-0.2, -0.4], [0.5, 0.5]),
            result("adamerging_layer_wise", [0.6, 0.6], [-0.6, -0.8], [0.2, 0.2])]
    assert job_score(rows) == pytest.approx(-0.7)
    assert job_score(rows, "entropy") == pytest.approx(0.2)
    assert job_score([result("a", [0.5, 0.5], [math.inf, 0.1], [0.5, 0.5])]) is None


@pytest.mark.parametrize(("values", "expected"), [
    ([1e-3, 3e-3, 1e-2, 3e-2], True),  # step sizes
    ([1e-4, 1e-3], True),
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], False),  # a decade, linearly spaced
    ([0.1, 0.2, 0.3], False),  # less than a decade
    ([0.0, 1e-3, 1e-2], False),
    ([-1e-2, 1e-3, 1e-1], False),
])
def test_log_spaced_values_are_told_apart(values, expected):
    assert log_spaced(values) is expected


def test_a_swept_step_size_is_plotted_on_a_log_axis(tmp_path, monkeypatch):
    from adamerge.reporting import plots as report_plots

    figures = []
    monkeypatch.setattr(report_plots, "png_bytes", lambda fig: figures.append(fig) or PNG)
    sweep = tmp_path / "sweep"
    for index, lr in enumerate(("0.0003", "0.001", "0.003", "0.01")):
        make_job(sweep, f"{index}_a", [f"method.lr={lr}"], {"a": result("a", [0.5, 0.6], [-0.1 * index, 0.1], [0.2, 0.2])})
    make_job(sweep, "4_a", ["method.lr=bad"], error={"type": "ValueError", "message": "bad lr"})
    write_summary_files(sweep)
    (top, bottom) = figures[0].axes
    assert bottom.get_xscale() == top.get_xscale() == "log"


@pytest.mark.parametrize(("key", "values", "expected"), [
    ("method.lr", [1e-3, 2e-3, 3e-3], True),  # a step size: a log axis even within a decade
    ("method.mask_lr", [0.01, 0.02], True),
    ("lr", [0.5, 1.0], True),
    ("method.lr", [0.0, 1e-3], False),  # a zero has no place on a log axis
    ("trainer.max_steps", [100.0, 200.0, 300.0], False),
    ("method.init_value", [0.1, 0.3, 1.0], True),  # not a step size, but positive and log-spaced over a decade
    ("method.init_value", [0.1, 1.0, 10.0], True),
    ("method.slr", [1.0, 2.0, 3.0], False),  # only the name 'lr' or a '_lr' suffix counts
])
def test_log_axis_for_step_sizes_and_decade_spanning_values(key, values, expected):
    assert log_axis(key, values) is expected


@pytest.mark.parametrize(("key", "values", "scale"), [
    ("method.lr", ("0.001", "0.002", "0.003"), "log"),
    ("method.init_value", ("0.1", "0.2", "0.3"), "linear"),
])
def test_sweep_plot_axis_scale_follows_the_parameter(tmp_path, monkeypatch, key, values, scale):
    from adamerge.reporting import plots as report_plots

    figures = []
    monkeypatch.setattr(report_plots, "png_bytes", lambda fig: figures.append(fig) or PNG)
    sweep = tmp_path / "sweep"
    for index, value in enumerate(values):
        make_job(sweep, f"{index}_a", [f"{key}={value}"], {"a": result("a", [0.5, 0.6], [-0.1 * index, 0.1], [0.2, 0.2])})
    write_summary_files(sweep)
    (top, bottom) = figures[0].axes
    assert bottom.get_xscale() == top.get_xscale() == scale


def test_pick_on_edge_cases():
    criterion = get_criterion("objective")
    assert pick([], criterion) == (None, "no finished merge has a label-free score")
    tied = [{"method": "a", "objective": -1.0, "average_accuracy": 0.2},
            {"method": "b", "objective": -1.0, "average_accuracy": 0.4}]
    assert pick(tied, criterion) == (0, None) and pick_by_accuracy(tied) == 1
    with pytest.raises(ValueError, match="selection.name='accuracy'"):
        get_criterion("accuracy")


def test_expert_agreement_picks_across_objectives_where_the_objective_may_not():
    """Agreement with each task's expert is one quantity whatever a job minimised; objective values of different
    objectives never compare."""
    from adamerge.reporting.sweep import result_row

    def row(method, objective, value, agreement):
        return result_row({"method": method, "objective": {"name": objective}, "average_accuracy": 0.5,
                           "accuracy": {"a": 0.5, "b": 0.5},
                           "unlabeled": {"objective": {"a": value, "b": value}, "entropy": {"a": 0.1, "b": 0.1},
                                         "expert_agreement": {"a": agreement[0], "b": agreement[1]}}})

    rows = [row("x", "entropy", -5.0, (0.8, 0.9)), row("y", "expert_kl", 0.1, (0.95, 0.97)),
            row("z", "information_maximization", -2.0, (0.9, 0.9))]
    assert rows[1]["expert_agreement"] == pytest.approx(0.96)
    assert pick(rows, get_criterion("expert_agreement")) == (1, None)
    index, reason = pick(rows, get_criterion("objective"))
    assert index is None and "different objectives" in reason
    missing = [dict(rows[0], expert_agreement=None), rows[2]]  # a run that did not measure it is no candidate
    assert pick(missing, get_criterion("expert_agreement")) == (1, None)


def test_rebuilding_a_summary_by_hand_and_bad_directories(sweep, tmp_path, capsys):
    assert sweep_main([str(sweep)]) == 1  # a failed job makes the exit status non-zero
    assert "label-free pick" in capsys.readouterr().out and (sweep / "sweep_summary.md").exists()
    assert sweep_main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert sweep_main([str(tmp_path / "empty")]) == 2
    assert "no job directories" in capsys.readouterr().err


def test_multirun_writes_the_summary_logs_each_job_to_one_wandb_group_and_keeps_going_after_a_failure(zoo, tmp_path):
    """Two jobs learn or merge (logged to wandb offline); two are refused (seed=-1): the sweep still writes
    every row, the summary marks the failures, and the command exits non-zero."""
    sweep = tmp_path / "sweep"
    finished = adamerge(tmp_path / "unused", zoo, "--multirun", "method=adamerging_task_wise,task_arithmetic",
                        "seed=0,-1", "trainer.max_steps=3", "logger=wandb", f"hydra.sweep.dir={sweep}", check=False)
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert "2 of 4 sweep rows failed" in finished.stderr and "seed=-1 is invalid" in finished.stderr

    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["swept"] == ["method", "seed"]
    statuses = {(r["overrides"]["method"], r["overrides"]["seed"]): r["status"] for r in summary["rows"]}
    assert statuses == {("adamerging_task_wise", "0"): "ok", ("task_arithmetic", "0"): "ok",
                        ("adamerging_task_wise", "-1"): "failed", ("task_arithmetic", "-1"): "failed"}
    learned = next(r for r in summary["rows"] if r["method"] == "adamerging_task_wise" and r["status"] == "ok")
    results = json.loads((sweep / learned["job_dir"] / "results.json").read_text())
    objectives = results["unlabeled"]["objective"]
    assert set(objectives) == set(results["tasks"])
    assert learned["objective"] == pytest.approx(sum(objectives.values()) / len(objectives))
    assert results["coefficients"] and (sweep / learned["job_dir"] / "merged_model" / "model.safetensors").exists()
    assert set(summary["plots"]) == {"method", "seed"} and (sweep / summary["plots"]["method"]).read_bytes()[:8] == PNG
    picked = summary["rows"][summary["selection"]["label_free_pick"]]
    assert picked["objective"] == min(r["objective"] for r in summary["rows"] if r["status"] == "ok")
    page = write_report(sweep).read_text()  # the HTML report of this real sweep
    assert all(row["job"] in page for row in summary["rows"]) and "seed=-1 is invalid" in page
    assert page.count("data:image/png;base64,") >= len(summary["plots"]) + 2

    runs = sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # one run per finished method; the refused jobs never started one
    for path in runs:
        records = wandb_records(path)
        job = path.parents[2].name
        method = "adamerging_task_wise" if "adamerging" in job else "task_arithmetic"
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run.run_group, run.job_type, run.display_name) == (str(sweep), method, job)
        config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
                  for item in r.config.update}
        assert config["method"]["name"] == method and config["seed"] == 0
        assert config["modelpool"]["pretrained"].startswith(str(zoo))  # resolved, not ${...}
        assert config["trainer"]["max_steps"] == 3 and "method_hyperparameters" in config
        history = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        keys = set().union(*history)
        assert {"final/average_accuracy", "final/seconds", "final/peak_memory_mb"} <= keys
        assert {f"final/accuracy/{t}" for t in results["tasks"]} <= keys
        assert {f"final/unlabeled_objective/{t}" for t in results["tasks"]} <= keys
        if method == "adamerging_task_wise":
            assert sum("train/objective" in step for step in history) == 3  # every step, not every 10th
            assert {f"train/entropy/{t}" for t in results["tasks"]} <= keys
            assert {"profile/forward/ms_per_step", "coefficients_heatmap/_type", "coefficients/_type"} <= keys


def test_optuna_search_minimises_the_label_free_score(zoo, tmp_path):
    """conf/hparams_search/adamerging with 3 trials: every trial is a sweep row, Optuna's best value is the
    lowest label-free objective, and its best trial is the summary's label-free pick."""
    sweep = tmp_path / "search"
    adamerge(tmp_path / "unused", zoo, "hparams_search=adamerging", "hydra.sweeper.n_trials=3",
             "trainer.max_steps=choice(2,3)", "logger=none", f"hydra.sweep.dir={sweep}")
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    rows = summary["rows"]
    assert len(rows) == 3 and all(r["status"] == "ok" and r["method"] == "adamerging_layer_wise" for r in rows)
    assert set(summary["swept"]) == {"method.lr", "method.init_value", "trainer.max_steps"}
    for row in rows:
        assert 0.0003 <= float(row["overrides"]["method.lr"]) <= 0.1
        assert 0.05 <= float(row["overrides"]["method.init_value"]) <= 0.6
        assert row["overrides"]["trainer.max_steps"] in ("2", "3")
        config = json.loads((sweep / row["job_dir"] / "results.json").read_text())["config"]
        assert config["lr"] == pytest.approx(float(row["overrides"]["method.lr"]))  # the trial's value was used
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(r["objective"] for r in rows))
    picked = rows[summary["selection"]["label_free_pick"]]
    assert float(picked["overrides"]["method.lr"]) == pytest.approx(best["best_params"]["method.lr"])
