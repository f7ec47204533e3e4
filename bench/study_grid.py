"""The learned-merging study as one table: every learned method × objective × base cell on every study zoo.

``bench/learned_study.py`` runs the cells (each invocation a slice of the grid: an objective study, a base study, a
method study) and writes its own table. This script gathers every cell those runs produced into one table per zoo
-- mean ± std of the average accuracy over seeds, normalised accuracy (merged ÷ individual), seconds and peak
memory per run, against every data-free method -- and says how much of the grid (every learned method × 4
objectives × 5 bases, plus progressive distillation, × 3 zoos × 3 seeds; ``GRID``) has been run, so a missing cell
is visible rather than silently absent; the cells still short of a seed close the table as the
``bench/learned_study.py`` invocations that fill them.

    python bench/study_grid.py             # bench/results/learned_study_grid.{md,json}

Sources, in order (a later one never replaces a seed an earlier one gave): the run directories of
``bench/learned_study.py`` (``--runs``: bench/runs/learned_study, bench/runs/learned_study_text), then the JSON
files it wrote (``bench/results/learned_study*.json``), then this script's own previous table
(bench/results/learned_study_grid.json): the run directories are not committed, so the committed grid is the archive
of every run a fresh checkout no longer has, and regenerating it only ever adds seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRID_OUT = ROOT / "bench" / "results" / "learned_study_grid"  # the committed table (.md, .json): also the archive
PAGE = ROOT / "docs" / "methods.md"  # the page holding this script's generated block
sys.path.insert(0, str(ROOT))
from bench.learned_study import (BASES, DATA_FREE, OBJECTIVES, cell_name, load_rows, mean_std, safe,  # noqa: E402
                                 static_lines, static_seed)

# Every learned method the registry offers, with the bases and objectives it is crossed with (its _on_<base>
# variants are cells of this grid, not methods of their own). AdaMerging++ is AdaMerging over TIES's per-task vectors:
# it carries its base, so it is crossed with the objectives only; progressive distillation minimises its own
# block-output loss whatever the objective setting, so it is one cell per zoo (on the Iso-CTS residual base, as the
# demo runs it).
CROSSED = ["adamerging_task_wise", "adamerging_layer_wise", "concrete_task_arithmetic",
           "concrete_adamerging_layer_wise", "adarank"]
GRID = ([(m, BASES, OBJECTIVES) for m in CROSSED]
        + [(m, ["none"], OBJECTIVES) for m in ("adamerging_task_wise_plus_plus", "adamerging_layer_wise_plus_plus")]
        + [("progressive_distillation", ["iso_cts:residual"], ["weighted_sum"])])
ZOO_ORDER = ["default", "second", "text"]
SEEDS = [0, 1, 2]
# Setting groups the studies ran as cells of their own (step sizes); the grid shows them as rows of their own too.
SETTING_GROUPS = [[], ["lr=0.01"], ["lr=0.03"], ["mask_lr=0.01"], ["mask_lr=0.1"]]


def brief(row: dict) -> dict:
    return {key: row[key] for key in ("average_accuracy", "accuracy", "seconds", "peak_memory_mb")}


def from_runs(runs: list[Path]) -> dict:
    """{(zoo, method, objective, base label): {seed: row}} and {zoo: static rows} from run directories."""
    cells: dict = {}
    statics: dict = {}
    for root in runs:
        for zoo in ZOO_ORDER:
            if not (root / zoo).is_dir():
                continue
            static = load_rows(root / zoo / f"seed{static_seed(root, zoo, SEEDS)}" / "static")
            if static:
                statics.setdefault(zoo, {m: {**brief(r), "tasks": r["tasks"]} for m, r in static.items()})
            for seed in SEEDS:
                for objective in OBJECTIVES:
                    for base in BASES:
                        for settings in SETTING_GROUPS:
                            rows = load_rows(root / zoo / f"seed{seed}" / cell_name(objective, base, settings))
                            label = base + "".join(f" {s}" for s in settings)
                            for method, row in rows.items():
                                cells.setdefault((zoo, method, objective, label), {}).setdefault(seed, brief(row))
    return cells, statics


def from_json(files: list[Path], cells: dict, statics: dict) -> None:
    """Add the seeds the result files hold that the run directories did not (runs that are gone)."""
    for path in files:
        raw = json.loads(path.read_text())
        for zoo, parts in raw.items():
            statics.setdefault(zoo, parts["static"])
            for entry in parts["learned"]:
                key = (zoo, entry["method"], entry["objective"], entry["base"])
                for position, run in enumerate(entry["runs"]):
                    # The oldest files kept no seed; their runs are seeds 0, 1, 2 in order.
                    cells.setdefault(key, {}).setdefault(run.get("seed", SEEDS[position]), brief(run))


def from_grid(path: Path, cells: dict) -> None:
    """Add the seeds this script's previous output holds that no other source gave (runs of earlier machines)."""
    if not path.is_file():
        return
    for row in json.loads(path.read_text())["rows"]:
        key = (row["zoo"], row["method"], row["objective"], row["base"])
        for seed, run in row["runs"].items():
            cells.setdefault(key, {}).setdefault(int(seed), run)


def coverage(cells: dict) -> tuple[int, int, list[str], dict[tuple, list[str]]]:
    """(cells with every seed, cells in the grid, lines per method: how many of its cells have every seed, the
    methods still short of a seed per (zoo, objective, base, the seeds they lack), in GRID's order)."""
    done = total = 0
    lines = []
    missing: dict[tuple, list[str]] = {}
    for method, bases, objectives in GRID:
        complete = 0
        for zoo in ZOO_ORDER:
            for objective in objectives:
                for base in bases:
                    filled = filling_runs(cells, zoo, method, objective, base) is not None
                    complete += filled
                    if not filled:  # what the plain row (the one to_run's command runs) lacks
                        lacking = tuple(sorted(set(SEEDS) - set(cells.get((zoo, method, objective, base), {}))))
                        missing.setdefault((zoo, objective, base, lacking), []).append(method)
        cells_of_method = len(ZOO_ORDER) * len(objectives) * len(bases)
        done, total = done + complete, total + cells_of_method
        lines.append(f"| {method} | {complete} / {cells_of_method} |")
    return done, total, lines, missing


def filling_runs(cells: dict, zoo: str, method: str, objective: str, base: str) -> dict | None:
    """The seeds of the row that fills a cell -- one row with every seed, since seeds of different step sizes do not
    add up: its plain row, else the first of its step-size rows (``<base> lr=...``) by name; None when no row has
    every seed."""
    labels = sorted((label != base, label) for (z, m, o, label) in cells
                    if (z, m, o) == (zoo, method, objective) and label.split(" ")[0] == base)
    for _, label in labels:
        if set(SEEDS) <= set(runs := cells[(zoo, method, objective, label)]):
            return runs
    return None


def cell_mean(cells: dict, zoo: str, method: str, objective: str, base: str) -> float | None:
    """A cell's mean accuracy (%) over the seeds of the row that fills it (:func:`filling_runs`), or None."""
    runs = filling_runs(cells, zoo, method, objective, base)
    return None if runs is None else 100 * statistics.mean(runs[s]["average_accuracy"] for s in SEEDS)


def comparisons(cells: dict, zoos: list[str]) -> list[str]:
    """What the grid says across its cells (:func:`cell_mean`), per zoo whose grid is complete: the residual against
    the split form on each base, over every (method, objective) pair; and each objective and each base averaged over
    the CROSSED methods and the other axis, with how many (method, other value) pairs it is the best for."""
    if not zoos:
        return []
    lines = ["### Across the grid", "",
             "Each cell's mean over every seed (its plain row, or the step-size row that filled it), on the zoos whose "
             f"grid is complete: {', '.join(zoos)}. *Best for*: of the (method, other axis) pairs, how many this value "
             "is the best for.", "",
             "| zoo | base | residual − split, mean over (method, objective) pairs | residual ahead | pairs |",
             "|---|---|---:|---:|---:|"]
    for zoo in zoos:
        for base in dict.fromkeys(b.split(":")[0] for b in BASES if ":" in b):
            gaps = [cell_mean(cells, zoo, method, objective, f"{base}:residual")
                    - cell_mean(cells, zoo, method, objective, f"{base}:split")
                    for method, bases, objectives in GRID if f"{base}:split" in bases for objective in objectives]
            lines.append(f"| {zoo} | {base} | {statistics.mean(gaps):+.1f} | {sum(g > 0 for g in gaps)} | {len(gaps)} |")
    for axis, values, others in (("objective", OBJECTIVES, BASES), ("base", BASES, OBJECTIVES)):
        lines += ["", f"| zoo | {axis} | mean accuracy over {len(CROSSED)} methods × {len(others)} "
                  f"{'bases' if axis == 'objective' else 'objectives'} | best for |", "|---|---|---:|---:|"]
        pairs = [(method, other) for method in CROSSED for other in others]
        for zoo in zoos:
            score = {(method, value, other): cell_mean(cells, zoo, method, *((value, other) if axis == "objective"
                                                                             else (other, value)))
                     for method, other in pairs for value in values}
            best = [max(values, key=lambda value: score[method, value, other]) for method, other in pairs]
            for value in values:
                mean = statistics.mean(score[method, value, other] for method, other in pairs)
                lines.append(f"| {zoo} | {value} | {mean:.1f} | {best.count(value)} / {len(pairs)} |")
    return lines + [""]


def to_run(missing: dict[tuple, list[str]]) -> list[str]:
    """The cells still short of a seed, as the bench/learned_study.py invocations that fill them: one per (zoo,
    objective, base, seeds lacking), naming only the methods and seeds that lack them (a job runs every method it
    names in one process per seed, and seeds kept only in the committed grid have no run directory to reuse)."""
    if not missing:
        return []
    lines = [f"### Still to run ({sum(map(len, missing.values()))} cells)", "",
             "Each line fills a group of the missing cells; two may run side by side when their zoo, objective or base "
             "differ. Their tables go under bench/runs/ (not committed); this script then gathers the runs.", "", "```"]
    for (zoo, objective, base, seeds), methods in sorted(missing.items(),
                                                         key=lambda item: ZOO_ORDER.index(item[0][0])):
        runs = "learned_study_text" if zoo == "text" else "learned_study"
        lines.append(f"python bench/learned_study.py --zoos {zoo} --objectives {objective} --bases {base} "
                     f"--methods {' '.join(methods)} --seeds {' '.join(map(str, seeds))} --jobs 1 "
                     f"--runs bench/runs/{runs} --out bench/runs/tables/{zoo}_{safe(objective)}_{safe(base)}")
    return lines + ["```", ""]


def zoo_table(zoo: str, static: dict, cells: dict) -> list[str]:
    individual = static["individual"]["average_accuracy"]
    best = max(DATA_FREE, key=lambda m: static[m]["average_accuracy"])
    lines = [f"### Zoo `{zoo}` ({', '.join(static['pretrained'].get('tasks') or static['individual']['accuracy'])})", "",
             "| row | objective | base | seeds | average accuracy | normalised | vs best data-free | seconds | peak MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += static_lines(static, before=" 1 |", after=" |")
    ranked = sorted(((key, runs) for key, runs in cells.items() if key[0] == zoo),  # ties in a fixed order
                    key=lambda item: (-statistics.mean(r["average_accuracy"] for r in item[1].values()), item[0]))
    for (_, method, objective, base), runs in ranked:
        accuracy = [runs[s]["average_accuracy"] for s in sorted(runs)]
        gap = 100 * (statistics.mean(accuracy) - static[best]["average_accuracy"])
        lines.append(f"| {method} | {objective} | {base} | {len(runs)} | {mean_std(accuracy)} | "
                     f"{mean_std([a / individual for a in accuracy])} | {gap:+.1f} | "
                     f"{statistics.mean(r['seconds'] for r in runs.values()):.0f} | "
                     f"{statistics.mean(r['peak_memory_mb'] for r in runs.values()):.0f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", default=[ROOT / "bench" / "runs" / "learned_study",
                                                                  ROOT / "bench" / "runs" / "learned_study_text"])
    parser.add_argument("--out", type=Path, default=GRID_OUT)
    parser.add_argument("--readme", action="store_true", help="also rewrite the learned-study-grid block of "
                        "docs/methods.md (how much of the grid is run, by method)")
    args = parser.parse_args()
    cells, statics = from_runs(args.runs)
    # This script's own tables are not study results (another format), wherever --out writes this time.
    results = sorted(p for p in (ROOT / "bench" / "results").glob("learned_study*.json")
                     if p.with_suffix("") not in (args.out, GRID_OUT))
    from_json(results, cells, statics)
    for archive in dict.fromkeys([args.out, GRID_OUT]):  # a table written elsewhere still keeps the committed runs
        from_grid(archive.with_suffix(".json"), cells)
    done, total, per_method, missing = coverage(cells)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    text = ["# Learned-merging study: the whole grid", "",
            f"Generated by `python bench/study_grid.py` ({machine}) from the runs of `bench/learned_study.py` and the "
            f"result files it wrote ({', '.join(p.name for p in results)}). Average accuracy (%) after 100 steps, mean "
            "± std over the seeds a row has; normalised = merged ÷ individual models (%); seconds and peak memory "
            "per run (runs shared the cores two at a time). A base written with a setting (`lr=0.03`) ran with that "
            "setting for every learned method of its cell.", "",
            f"**Grid filled: {done} of {total} cells have all {len(SEEDS)} seeds**: {len(CROSSED)} learned methods × "
            f"{len(OBJECTIVES)} objectives × {len(BASES)} bases, AdaMerging++ (task- and layer-wise, its TIES base "
            f"built in) × {len(OBJECTIVES)} objectives and progressive distillation (its own loss, on the Iso-CTS "
            f"residual base), on {len(ZOO_ORDER)} zoos. By method:", "", "| method | cells with every seed |", "|---|---:|",
            *per_method, ""]
    for zoo in ZOO_ORDER:
        if zoo in statics:
            text += zoo_table(zoo, statics[zoo], cells)
    across = comparisons(cells, [zoo for zoo in ZOO_ORDER if not any(key[0] == zoo for key in missing)])
    text += across + to_run(missing)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(text))
    raw = [{"zoo": z, "method": m, "objective": o, "base": b, "runs": {str(s): r for s, r in sorted(runs.items())}}
           for (z, m, o, b), runs in sorted(cells.items())]
    args.out.with_suffix(".json").write_text(json.dumps({"filled": done, "cells": total, "rows": raw}, indent=1))
    summary = text[4:6 + 3 + len(per_method)]
    print("\n".join(text[:6 + 3 + len(per_method)]))
    if args.readme:
        from adamerge.reporting.results import replace_marked_block

        replace_marked_block(PAGE, "learned-study-grid", "\n".join(
            [f"Generated by `python bench/study_grid.py --readme` ({machine}); every cell, with seconds and peak memory "
             f"per run: {args.out.with_suffix('.md').relative_to(ROOT)}.", "", *summary, *across]).rstrip() + "\n")


if __name__ == "__main__":
    main()
