"""Study: which label-free objective should learned merging minimise by default?

Runs objective × learned method on two zoos built from real weights and data (the default demo zoo and the
second zoo with other tasks, see ``adamerge/demo/zoo.py``), several seeds each, with the demo's budget (100 steps
per method, ``conf/pool_data/demo_demo.yaml``), through the ``adamerge`` command itself. Every job is one
comparison run (static baselines + every learned method) for one (zoo, objective, seed); finished jobs are
reused, so an interrupted study resumes where it stopped. Writes a markdown table (mean ± std of the average
accuracy over seeds, seconds per method, how often each learned method beats task arithmetic, the pretrained
model and the best data-free method) and the raw rows as JSON.

    python bench/objectives.py                       # the full study (2 zoos × 3 objectives × 3 seeds)
    python bench/objectives.py --zoos default --seeds 0 --objectives entropy information_maximization

An objective may carry settings: ``information_maximization:normalize=true``. The second zoo needs
Fashion-MNIST (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "methods.md"  # the page holding this script's generated block
STATIC = ["pretrained", "individual", "weight_average", "task_arithmetic", "ties"]
DATA_FREE = ["weight_average", "task_arithmetic", "ties"]
LEARNED = [
    "adamerging_task_wise",
    "adamerging_layer_wise",
    "adamerging_layer_wise_plus_plus",
    "concrete_task_arithmetic",
    "concrete_adamerging_layer_wise",
]
ZOOS = {"default": "demo", "second": "demo_second", "text": "demo_text"}  # zoo -> experiment config
# What a study runs unless --zoos says otherwise: the image zoos its published tables were made on (the text zoo needs
# the demo-text extra and is studied on its own, with --zoos text).
DEFAULT_ZOOS = ["default", "second"]


def build_zoos(zoos: list[str], cache: Path) -> None:
    """Build each study zoo once, before the jobs that share it start."""
    from adamerge.demo.zoo import SECOND_ZOO_TASKS, build_demo_zoo

    for zoo in zoos:
        if zoo == "text":  # all-MiniLM-L6-v2 on sentence tasks (adamerge/demo/text_zoo.py)
            from adamerge.demo.text_zoo import build_text_zoo

            build_text_zoo(cache)
        else:
            build_demo_zoo(cache, recipe={"tasks": list(SECOND_ZOO_TASKS)} if zoo == "second" else None)


def objective_overrides(spec: str) -> list[str]:
    """``name`` or ``name:key=value,key=value`` as Hydra overrides."""
    name, _, settings = spec.partition(":")
    overrides = [f"objective={name}"]
    overrides += [f"objective.{item}" for item in settings.split(",") if item]
    return overrides


def run_job(zoo: str, objective: str, seed: int, methods: list[str], runs: Path, cache: Path) -> Path:
    """One comparison run; skipped when its summary already exists (resume)."""
    run_dir = runs / zoo / objective.replace(":", "_").replace(",", "_").replace("=", "-") / f"seed{seed}"
    if (run_dir / "summary.json").is_file():
        return run_dir
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "ADAMERGE_CACHE_DIR": str(cache)}
    command = [
        sys.executable, "-m", "adamerge.cli.main", f"experiment={ZOOS[zoo]}", *objective_overrides(objective),
        f"seed={seed}", f"method.methods=[{','.join(STATIC + methods)}]", "logger=none", "num_threads=1",
        "export.enabled=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{zoo}/{objective}/seed{seed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    print(f"{zoo} {objective} seed {seed}: {time.perf_counter() - start:.0f}s", flush=True)
    return run_dir


def load_rows(run_dir: Path) -> dict[str, dict]:
    rows = {}
    for method_dir in run_dir.iterdir():
        result = method_dir / "results.json"
        if result.is_file():
            rows[method_dir.name] = json.loads(result.read_text())
    return rows


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def summarise(results: dict, zoos: list[str], objectives: list[str], seeds: list[int], methods: list[str]) -> str:
    """The markdown tables: static rows, then learned method × objective per zoo, and the win counts."""
    lines = []
    for zoo in zoos:
        first = results[zoo][objectives[0]][seeds[0]]
        tasks = first["pretrained"]["tasks"]
        lines += [f"### Zoo `{zoo}` ({', '.join(tasks)}; {len(seeds)} seeds)", ""]
        static = " · ".join(f"{m} {100 * first[m]['average_accuracy']:.1f}" for m in STATIC)
        lines += [f"Data-free and reference rows (deterministic): {static}.", ""]
        header = ["learned method", *[f"{o}" for o in objectives]]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(objectives)) + "|"]
        for method in methods:
            cells = [mean_std([results[zoo][o][s][method]["average_accuracy"] for s in seeds]) for o in objectives]
            lines.append("| " + " | ".join([method, *cells]) + " |")
        lines += ["", "Beats task arithmetic / the pretrained model / the best data-free method, out of "
                  f"{len(seeds)} seeds; mean seconds per run:", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(objectives)) + "|"]
        best_static = max(first[m]["average_accuracy"] for m in DATA_FREE)
        for method in methods:
            cells = []
            for o in objectives:
                runs = [results[zoo][o][s] for s in seeds]
                acc = [r[method]["average_accuracy"] for r in runs]
                wins = [sum(a > r[ref]["average_accuracy"] for a, r in zip(acc, runs)) for ref in ("task_arithmetic", "pretrained")]
                wins.append(sum(a > best_static for a in acc))
                seconds = statistics.mean(r[method]["seconds"] for r in runs)
                cells.append(f"{wins[0]}/{wins[1]}/{wins[2]} · {seconds:.0f}s")
            lines.append("| " + " | ".join([method, *cells]) + " |")
        lines.append("")
    return "\n".join(lines)


def averages(results: dict, zoos: list[str], objectives: list[str], seeds: list[int], methods: list[str]) -> str:
    """One compact table for docs/methods.md: mean average accuracy over seeds, learned method × objective, per zoo."""
    header = ["zoo", "method", *objectives]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(objectives)) + "|"]
    for zoo in zoos:
        first = results[zoo][objectives[0]][seeds[0]]
        for method, kind in [("pretrained", "no merge"), *[(m, "data-free") for m in DATA_FREE]]:
            value = f"{100 * first[method]['average_accuracy']:.1f}"
            lines.append("| " + " | ".join([zoo, f"{method} ({kind})", *[value] * len(objectives)]) + " |")
        for method in methods:
            cells = [f"{100 * statistics.mean(results[zoo][o][s][method]['average_accuracy'] for s in seeds):.1f}"
                     for o in objectives]
            lines.append("| " + " | ".join([zoo, method, *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoos", nargs="+", default=DEFAULT_ZOOS, choices=list(ZOOS))
    parser.add_argument("--objectives", nargs="+", default=["entropy", "information_maximization", "confident_entropy"])
    parser.add_argument("--methods", nargs="+", default=LEARNED)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="comparison runs in parallel (1 torch thread each)")
    parser.add_argument("--runs", type=Path, default=ROOT / "bench" / "runs" / "objectives", help="run dirs (not committed)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("ADAMERGE_CACHE_DIR", ROOT / "bench" / "runs" / "cache")))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "objectives")
    parser.add_argument("--readme", action="store_true", help="also rewrite the objective-study table of docs/methods.md")
    args = parser.parse_args()

    start = time.perf_counter()
    build_zoos(args.zoos, args.cache)
    jobs = [(z, o, s) for z in args.zoos for o in args.objectives for s in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        dirs = list(pool.map(lambda job: run_job(*job, args.methods, args.runs, args.cache), jobs))
    results: dict = {}
    for (zoo, objective, seed), run_dir in zip(jobs, dirs):
        results.setdefault(zoo, {}).setdefault(objective, {})[seed] = load_rows(run_dir)

    table = summarise(results, args.zoos, args.objectives, args.seeds, args.methods)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    run_minutes = sum(r["seconds"] for z in results.values() for o in z.values() for rows in o.values()
                      for r in rows.values()) / 60
    header = (f"# Objective study\n\nGenerated by `python bench/objectives.py {' '.join(sys.argv[1:])}`".rstrip()
              + f" on {machine}; each job one process with 1 torch thread, jobs side by side (so the seconds "
              f"below include sharing the cores); the runs took {run_minutes:.0f} min in all (sum over methods and "
              f"jobs; this invocation {(time.perf_counter() - start) / 60:.0f} min, finished jobs reused).\n"
              "Average accuracy (%) over the zoo's tasks after 100 steps, mean ± std over seeds.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(header + table)
    raw = {z: {o: {str(s): {m: {k: r[k] for k in ("average_accuracy", "accuracy", "seconds")} for m, r in rows.items()}
                       for s, rows in by_seed.items()} for o, by_seed in by_obj.items()} for z, by_obj in results.items()}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, sort_keys=True))
    print(header + table)
    if args.readme:
        from adamerge.reporting.results import replace_marked_block

        replace_marked_block(PAGE, "objective-study", f"Mean average accuracy (%) over seeds {args.seeds}, 100 steps "
                      f"(generated by `python bench/objectives.py --readme`; {machine}):\n\n"
                      + averages(results, args.zoos, args.objectives, args.seeds, args.methods))


if __name__ == "__main__":
    main()
