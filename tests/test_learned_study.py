"""bench/learned_study.py's own logic: which methods and settings a cell runs, and the 1-point verdict it writes."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "learned_study.py"
_spec = importlib.util.spec_from_file_location("learned_study", _SCRIPT)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def test_methods_and_settings_written_with_a_base_apply_to_that_base_only():
    methods = ["adamerging_layer_wise", "progressive_distillation@iso_cts:residual"]
    assert study.methods_for(methods, "none") == ["adamerging_layer_wise"]
    assert study.methods_for(methods, "iso_cts:residual") == ["adamerging_layer_wise", "progressive_distillation"]
    settings = ["lr=0.03@wudi:residual", "clamp=false"]
    assert study.settings_for(settings, "wudi:residual") == ["lr=0.03", "clamp=false"]
    assert study.settings_for(settings, "none") == ["clamp=false"]
    assert study.cell_name("weighted_sum", "wudi:residual", ["lr=0.03"]) == "weighted_sum/wudi_residual_lr-0.03"


def test_the_static_rows_come_from_the_lowest_seed_that_has_them_all(tmp_path):
    """They are deterministic: a study extended with --seeds 1 2 reuses seed 0's instead of running them again, and a
    seed directory missing one static row does not count."""
    assert study.static_seed(tmp_path, "text", [1, 2]) == 1  # none yet: the first seed asked for runs them
    for seed, names in ((2, study.STATIC), (1, study.STATIC[:-1]), (0, study.STATIC)):
        for name in names:
            (tmp_path / "text" / f"seed{seed}" / "static" / name).mkdir(parents=True)
            (tmp_path / "text" / f"seed{seed}" / "static" / name / "results.json").write_text("{}")
    assert study.static_seed(tmp_path, "text", [1, 2]) == 0
    (tmp_path / "text" / "seed0" / "static" / "wudi" / "results.json").unlink()
    assert study.static_seed(tmp_path, "text", [1, 2]) == 2


def test_a_failed_job_is_reported_at_once_and_the_others_go_on(monkeypatch, capsys):
    ran = []

    def run_job(zoo, seed, objective, base, methods, runs, cache, settings):
        ran.append(seed)
        if seed == 1:
            raise study.JobFailed(f"{zoo}/seed{seed}/{study.cell_name(objective, base, settings)}", "the traceback")

    monkeypatch.setattr(study, "run_job", run_job)
    args = type("Args", (), {"methods": ["adamerging_task_wise"], "runs": Path("runs"), "cache": Path("cache")})
    failed = [study.failure(("text", seed, "expert_kl", "none", []), args) for seed in (0, 1, 2)]
    assert ran == [0, 1, 2] and failed == [None, "text/seed1/expert_kl/none", None]
    assert "text/seed1/expert_kl/none failed:\nthe traceback" in capsys.readouterr().err


def _row(accuracy: float, seed: int = 0) -> dict:
    return {"average_accuracy": accuracy, "seed": seed}


@pytest.mark.parametrize(("learned", "met"), [([0.86, 0.87, 0.88], "meets"), ([0.84, 0.85, 0.85], "does not meet")])
def test_the_verdict_compares_the_best_learned_mean_with_the_best_data_free_row(learned, met):
    static = {m: _row(0.5) for m in study.DATA_FREE} | {"wudi": _row(0.85)}
    parts = {"static": static, "learned": {("adamerging_layer_wise", "weighted_sum", "none"): [_row(0.6)] * 3,
                                           ("adamerging_layer_wise", "weighted_sum", "wudi:residual"): [
                                               _row(a, seed) for seed, a in enumerate(learned)]}}
    text = study.verdict("text", parts, [0, 1, 2])
    assert f"it {met} the 1-point bar" in text and "base wudi:residual)" in text and "(wudi)" in text


def test_a_row_short_of_seeds_says_which_it_has():
    assert study.seeds_note([_row(0.5, 0), _row(0.5, 1)], [0, 1, 2]) == " (seeds 0, 1 only)"
    assert study.seeds_note([_row(0.5, 2)], [0, 1, 2]) == " (seed 2 only)"
    assert study.seeds_note([_row(0.5, s) for s in (2, 0, 1)], [0, 1, 2]) == ""


def test_the_grid_written_elsewhere_keeps_every_committed_run(tmp_path):
    """bench/study_grid.py --out <elsewhere> (no run directories) reads the committed table as its archive and not as
    a study result: the same cells are filled as in the committed table."""
    root = _SCRIPT.parent.parent
    committed = (root / "bench" / "results" / "learned_study_grid.md").read_text()
    subprocess.run([sys.executable, str(root / "bench" / "study_grid.py"), "--runs", str(tmp_path / "none"),
                    "--out", str(tmp_path / "grid")], check=True, capture_output=True, text=True, cwd=tmp_path)
    filled = re.compile(r"Grid filled: (\d+) of (\d+) cells")
    assert filled.search((tmp_path / "grid.md").read_text()).groups() == filled.search(committed).groups()


def _load_grid():
    spec = importlib.util.spec_from_file_location("study_grid", _SCRIPT.parent / "study_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grid_lists_each_missing_cell_with_only_the_methods_and_seeds_it_lacks():
    grid = _load_grid()
    run = {"average_accuracy": 0.5}
    full = {seed: run for seed in grid.SEEDS}
    cells = {(zoo, method, objective, base): dict(full) for zoo in grid.ZOO_ORDER
             for method, bases, objectives in grid.GRID for objective in objectives for base in bases}
    done, total, _, missing = grid.coverage(cells)
    assert done == total and missing == {} and grid.to_run(missing) == []

    # Layer-wise on the text zoo's TSV-M residual base: seed 2 missing, though a step-size row of it has all three.
    del cells[("text", "adamerging_layer_wise", "expert_kl", "tsv_merge:residual")][2]
    cells[("text", "adamerging_layer_wise", "expert_kl", "tsv_merge:residual lr=0.03")] = dict(full)
    assert grid.coverage(cells)[0] == total  # a base row with a setting and every seed fills the cell
    del cells[("text", "adamerging_layer_wise", "expert_kl", "tsv_merge:residual lr=0.03")]
    # A step-size row short of seeds does not stand for the plain row: the plain row's missing seed is what to run.
    cells[("text", "adamerging_layer_wise", "expert_kl", "tsv_merge:residual lr=0.01")] = {0: run}
    # Task-wise and AdaRank on the default zoo without a base: no seed at all.
    for method in ("adamerging_task_wise", "adarank"):
        del cells[("default", method, "feature_matching", "none")]
    done, _, _, missing = grid.coverage(cells)
    assert done == total - 3
    assert missing == {("text", "expert_kl", "tsv_merge:residual", (2,)): ["adamerging_layer_wise"],
                       ("default", "feature_matching", "none", (0, 1, 2)): ["adamerging_task_wise", "adarank"]}
    lines = grid.to_run(missing)
    assert lines[0] == "### Still to run (3 cells)"
    commands = [line for line in lines if line.startswith("python ")]
    assert commands[0].startswith("python bench/learned_study.py --zoos default --objectives feature_matching "
                                  "--bases none --methods adamerging_task_wise adarank --seeds 0 1 2 ")
    assert "--zoos text --objectives expert_kl --bases tsv_merge:residual --methods adamerging_layer_wise --seeds 2 " \
        in commands[1] and "--runs bench/runs/learned_study_text " in commands[1]


def test_across_the_grid_compares_forms_objectives_and_bases_on_hand_made_cells():
    grid = _load_grid()
    bonus = {"information_maximization": 0.0, "expert_kl": 0.01, "feature_matching": 0.02, "weighted_sum": 0.03,
             "none": 0.0, "iso_cts:residual": 0.02, "iso_cts:split": 0.01, "tsv_merge:residual": 0.0,
             "tsv_merge:split": 0.01}
    cells = {("default", method, objective, base): {seed: {"average_accuracy": 0.5 + bonus[objective] + bonus[base]}
                                                    for seed in grid.SEEDS}
             for method, bases, objectives in grid.GRID for objective in objectives for base in bases}
    # One cell filled by a step-size row only: it stands for the cell.
    cells[("default", "adarank", "expert_kl", "iso_cts:residual lr=0.01")] = cells.pop(
        ("default", "adarank", "expert_kl", "iso_cts:residual"))
    assert grid.cell_mean(cells, "default", "adarank", "expert_kl", "iso_cts:residual") == pytest.approx(53.0)
    assert grid.cell_mean(cells, "second", "adarank", "expert_kl", "iso_cts:residual") is None
    lines = grid.comparisons(cells, ["default"])
    pairs = len(grid.CROSSED) * len(grid.OBJECTIVES)
    assert f"| default | iso_cts | +1.0 | {pairs} | {pairs} |" in lines
    assert f"| default | tsv_merge | -1.0 | 0 | {pairs} |" in lines
    by_base = len(grid.CROSSED) * len(grid.BASES)
    assert f"| default | weighted_sum | 53.8 | {by_base} / {by_base} |" in lines
    assert f"| default | information_maximization | 50.8 | 0 / {by_base} |" in lines
    assert f"| default | iso_cts:residual | 53.5 | {pairs} / {pairs} |" in lines
    assert grid.comparisons(cells, []) == []
