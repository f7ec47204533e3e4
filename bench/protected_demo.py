"""Protected tasks on the demo zoo: does a protected task keep its accuracy while learned merging would lose it?

Runs task-wise AdaMerging (the demo's 100 steps and step size) four times on the default demo zoo, each scoring the
same protected set -- 64 images of digits' *training* split, which no evaluation uses:

1. the default objective (whatever conf/config.yaml names; the table says which), digits only reported (β = 0);
2. the papers' plain entropy, digits only reported (β = 0): entropy lowers digits where the default lifts it;
3. plain entropy with ``protected=demo_digits``: cross-entropy on the set, constraint ε = 0.05 nats over the
   starting merge;
4. plain entropy with ``protected=demo_digits_kl``: KL to the fine-tuned digits model on the set's images (labels
   unused), penalty β = 1.

Writes bench/results/protected_demo.{json,md} and the ``protected-demo`` block of docs/protected-tasks.md.

    python bench/protected_demo.py                  # four runs (~4 min on 2 idle cores; the zoo is built if absent)
    python bench/protected_demo.py --render-only    # the docs block from bench/results/protected_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from adamerge.reporting.results import replace_marked_block, write_json
from readme_demo import cpu_name

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "protected-tasks.md"  # the page holding this script's generated block
RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "bench" / "runs" / "protected_demo"
BASE = ["method=adamerging_task_wise", "logger=none", "export.enabled=false", "trainer.enable_progress_bar=false",
        "export.overwrite=true"]
REPORTED_ONLY = ["protected=demo_digits", "protected.tasks.digits.mode=penalty", "protected.tasks.digits.weight=0"]
CASES = {
    "default objective, digits reported only": REPORTED_ONLY,
    "entropy, digits reported only": ["objective=entropy", *REPORTED_ONLY],
    "entropy + cross-entropy constraint": ["objective=entropy", "protected=demo_digits"],
    "entropy + KL penalty": ["objective=entropy", "protected=demo_digits_kl"],
}


def run_case(name: str, overrides: list[str]) -> dict:
    run_dir = RUNS / name.replace(" ", "_").replace(",", "").replace("+", "and")
    command = [sys.executable, "-m", "adamerge.cli.main", *BASE, *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads((run_dir / "results.json").read_text())
    protected = result["protected"]["digits"]
    return {"command": "adamerge " + " ".join([*BASE[:1], *overrides]), "seconds": time.perf_counter() - start,
            "objective": result["objective"]["name"], "start_accuracy": result["start_accuracy"],
            "accuracy": result["accuracy"], "protected": {k: v for k, v in protected.items() if not k.endswith("_history")},
            "multiplier_max": max(protected["multiplier_history"], default=0.0), "coefficients": result["coefficients"]}


def label(name: str, case: dict) -> str:
    """A case's row name; the default case names the objective its run recorded, so a rerun after the default
    changes says so by itself."""
    return name.replace("default objective", f"default objective ({case['objective']})")


def render(results: dict) -> str:
    tasks = list(next(iter(results["cases"].values()))["accuracy"])
    lines = ["| case | " + " | ".join(tasks) + " | protected set (64 digits train images): start → end | budget L_ref + ε "
             "| max μ |", "|---|" + "---:|" * len(tasks) + "---|---|---:|"]
    for key, case in results["cases"].items():
        name = label(key, case)
        accuracy = [f"{100 * case['start_accuracy'][t]:.1f} → {100 * case['accuracy'][t]:.1f}" for t in tasks]
        protected = case["protected"]
        first, last = protected["scores"]["start"], protected["scores"]["end"]
        second, kind = ("accuracy", "CE") if protected["loss"] == "cross_entropy" else ("agreement", "KL")
        score = (f"{kind} {first['loss']:.3f} → {last['loss']:.3f} ({second} {100 * first[second]:.1f} → "
                 f"{100 * last[second]:.1f}%)")
        if protected["mode"] == "constraint":
            limit = protected["reference_loss"] + protected["budget"]
            budget = f"{limit:.3f}: {'kept' if protected['within_budget'] else 'exceeded'}"
        else:
            budget = f"none (penalty β = {protected['weight']:g})"
        lines.append(f"| {name} | " + " | ".join(accuracy) + f" | {score} | {budget} | {case['multiplier_max']:.2g} |")
    commands = "\n".join(f"- {label(name, case)}: `{case['command']}` ({case['seconds']:.0f} s; learned λ "
                         + ", ".join(f"{t} {c:.2f}" for t, c in zip(tasks, case["coefficients"])) + ")"
                         for name, case in results["cases"].items())
    return "\n".join([
        *lines, "",
        "Test accuracy (%) of each task (480 images) at the starting merge (task arithmetic, λ = 0.3) → after 100 "
        "steps of task-wise AdaMerging. The protected set's reference: the starting merge for cross-entropy (L_ref = "
        "its loss), the fine-tuned digits model for KL. Commands (the bench adds `logger=none export.enabled=false`):",
        "", commands, "",
        f"Generated by `python bench/protected_demo.py` on {results['machine']} ({results['date']}).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="render the docs block from the saved results")
    args = parser.parse_args()
    path = RESULTS / "protected_demo.json"
    if args.render_only:
        results = json.loads(path.read_text())
    else:
        results = {"machine": f"{os.cpu_count()} cores of an {cpu_name()}, no GPU",
                   "date": time.strftime("%Y-%m-%d"),
                   "cases": {name: run_case(name, overrides) for name, overrides in CASES.items()}}
        write_json(path, results)
    block = render(results)
    (RESULTS / "protected_demo.md").write_text(block + "\n")
    if not args.no_readme:
        replace_marked_block(PAGE, "protected-demo", block)
    print(block)


if __name__ == "__main__":
    main()
