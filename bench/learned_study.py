"""Study: how should learned merging learn, so that it beats the best data-free merge?

Learned method × objective × base (what it learns on top of, and in which form) on the study zoos built from real
weights and data (adamerge/demo/zoo.py; ``--zoos text``: the transformer zoo, adamerge/demo/text_zoo.py), several
seeds each, with the demo's budget (100 steps, conf/experiment/demo.yaml), through the ``adamerge`` command itself,
against every data-free method on the same zoo. One job is one run of one (zoo, seed, objective, base) cell; finished
jobs are reused, so an interrupted or extended study resumes (the static rows, deterministic, run once per zoo). A
failed job is reported when it fails and the others go on; the tables are then written from the runs that finished
and the script exits non-zero, naming the failed jobs.

    python bench/learned_study.py                                   # the default grid
    python bench/learned_study.py --zoos default --seeds 0 --objectives expert_kl --bases none iso_cts:residual
    python bench/learned_study.py --zoos text --bases none wudi:residual --set lr=0.03@wudi:residual

Bases are ``none`` (the raw task vectors) or ``<data-free method>:<form>`` with form ``residual`` (the base merge kept
whole under a learned per-layer scale plus per-task corrections from 0) or ``split`` (learn over the base's per-task
vectors, starting at its α, unclamped). Writes bench/results/learned_study.{md,json}: mean ± std of the average
accuracy over seeds, normalised accuracy (merged ÷ individual), seconds and peak memory per run; ``--readme`` also
rewrites the ``learned-study`` block of docs/methods.md (``learned-study-text`` for the text zoo).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "methods.md"  # the page holding this script's generated block
sys.path.insert(0, str(ROOT))
from bench.objectives import DEFAULT_ZOOS, ZOOS, build_zoos, objective_overrides  # noqa: E402

DATA_FREE = ["weight_average", "task_arithmetic", "ties", "tsv_merge", "iso_c", "iso_cts", "wudi"]
STATIC = ["pretrained", "individual", *DATA_FREE]
OBJECTIVES = ["information_maximization", "expert_kl", "feature_matching", "weighted_sum"]
BASES = ["none", "iso_cts:residual", "iso_cts:split", "tsv_merge:residual", "tsv_merge:split"]
BAR = 1.0  # points (mean over seeds) the best learned row must beat the best data-free row by, on every study zoo


def base_overrides(method: str, base: str) -> list[str]:
    """Hydra overrides that put ``method`` on ``base`` (through method_overrides, so a comparison job can carry them)."""
    if base == "none":
        return []
    name, form = base.split(":")
    key = f"++method_overrides.{method}"
    overrides = [f"{key}.base={name}", f"{key}.base_form={form}"]
    if form == "split":  # start at the data-free merge: λ = the method's α on its per-task pieces, not clamped to 1
        from adamerge.methods.registry import get_method

        overrides.append(f"{key}.init_value={get_method(name).defaults['alpha']}")
        if "clamp" in get_method(method).defaults:  # Concrete TA's λ does not learn: nothing to clamp
            overrides.append(f"{key}.clamp=false")
    return overrides


def methods_for(methods: list[str], base: str | None) -> list[str]:
    """``--methods`` entries run on every base, or, written ``method@base``, on that base only (a method that carries
    its own base in its zoo's pool_data, e.g. progressive_distillation on the text zoo, written ``@none``, is not put
    on another)."""
    return [m.partition("@")[0] for m in methods if m.partition("@")[2] in ("", base)]


def settings_for(settings: list[str], base: str | None) -> list[str]:
    """``--set`` entries (``key=value``) for every base, or, written ``key=value@base``, for that base only (e.g. a
    larger step size for the corrections of the residual bases than for λ on the raw task vectors)."""
    return methods_for(settings, base)


def safe(text: str) -> str:
    return text.replace(":", "_").replace(",", "_").replace("=", "-")


def run_job(zoo: str, seed: int, objective: str | None, base: str | None, methods: list[str], runs: Path,
            cache: Path, settings: list[str]) -> Path:
    """One comparison run (static rows when ``objective`` is None); skipped when its results already exist.
    ``settings`` (``key=value``) apply to every learned method of the job and name its cell."""
    settings = settings_for(settings, base)
    cell = "static" if objective is None else cell_name(objective, base, settings)
    run_dir = runs / zoo / f"seed{seed}" / cell
    methods = methods_for(methods, base)
    names = STATIC if objective is None else methods
    if not names or all((run_dir / name / "results.json").is_file() for name in names):
        return run_dir
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "ADAMERGE_CACHE_DIR": str(cache)}
    extra = [] if objective is None else [*objective_overrides(objective),
                                           *(o for m in methods for o in base_overrides(m, base)),
                                           *(f"++method_overrides.{m}.{s}" for m in methods for s in settings)]
    command = [
        sys.executable, "-m", "adamerge.cli.main", f"experiment={ZOOS[zoo]}", f"seed={seed}", *extra,
        f"method.methods=[{','.join(names)}]", "logger=none", "num_threads=1", "export.enabled=false",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
    ]
    if any(run_dir.glob("*/checkpoints/last.ckpt")):
        if recorded_methods(run_dir) == names:  # this job, stopped mid-learning: it continues where it stopped
            command.append("resume=true")
        else:  # another job's (other methods in the same cell), stopped: this one cannot continue it
            for stale in run_dir.glob("*/checkpoints"):
                shutil.rmtree(stale)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise JobFailed(f"{zoo}/seed{seed}/{cell}", f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    print(f"{zoo} seed {seed} {cell}: {time.perf_counter() - start:.0f}s", flush=True)
    return run_dir


class JobFailed(RuntimeError):
    """A job's ``adamerge`` command exited non-zero: ``job`` names its run directory (zoo/seed/cell)."""

    def __init__(self, job: str, output: str) -> None:
        super().__init__(f"{job} failed:\n{output}")
        self.job = job


def recorded_methods(run_dir: Path) -> list[str] | None:
    """The methods of the command that last ran in ``run_dir`` (its run_config.json), None when unreadable."""
    try:
        return list(json.loads((run_dir / "run_config.json").read_text())["method"]["methods"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_rows(run_dir: Path) -> dict[str, dict]:
    rows = {}
    for result in sorted(run_dir.glob("*/results.json")):
        rows[result.parent.name] = json.loads(result.read_text())
    return rows


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def seeds_note(rows: list[dict], seeds: list[int]) -> str:
    """Empty when a learned row has every seed asked for, else which ones it has (a study cut short says so)."""
    done = [r["seed"] for r in rows]
    return "" if sorted(done) == sorted(seeds) else f" (seed{'s' if len(done) > 1 else ''} {', '.join(map(str, done))} only)"


def cell_name(objective: str, base: str, settings: list[str]) -> str:
    return f"{safe(objective)}/{safe(base)}" + "".join(f"_{safe(s)}" for s in settings)


def setting_groups(args: argparse.Namespace) -> list[list[str]]:
    """``--set`` alone, then ``--set`` plus each ``--variant`` (``key=value[,key=value]``): one cell per group."""
    return [list(args.set)] + [[*args.set, *variant.split(",")] for variant in args.variant]


def static_seed(runs: Path, zoo: str, seeds: list[int]) -> int:
    """The seed whose run directory holds (or will hold) the zoo's static rows: the lowest seed that already has
    every one (they are deterministic, so one run serves every seed), else the first seed asked for -- a study
    extended by ``--seeds 1 2`` reuses seed 0's rows instead of running them again."""
    complete = [int(d.parent.name.removeprefix("seed")) for d in (runs / zoo).glob("seed*/static")
                if d.parent.name.removeprefix("seed").isdigit()
                and all((d / name / "results.json").is_file() for name in STATIC)]
    return min(complete, default=seeds[0])


def collect(args: argparse.Namespace) -> dict:
    """{zoo: {"static": the static rows (:func:`static_seed`), "learned": {(method, objective, base): [row per seed]}}}."""
    results: dict = {}
    for zoo in args.zoos:
        static = load_rows(args.runs / zoo / f"seed{static_seed(args.runs, zoo, args.seeds)}" / "static")
        learned: dict = {}
        for objective in args.objectives:
            for base in args.bases:
                for group in setting_groups(args):
                    settings = settings_for(group, base)
                    label = base + "".join(f" {s}" for s in settings)
                    for seed in args.seeds:
                        rows = load_rows(args.runs / zoo / f"seed{seed}" / cell_name(objective, base, settings))
                        for method in methods_for(args.methods, base):
                            if method in rows:
                                learned.setdefault((method, objective, label), []).append({**rows[method], "seed": seed})
        results[zoo] = {"static": static, "learned": learned}
    return results


def static_lines(static: dict, before: str = "", after: str = "") -> list[str]:
    """Table rows of the pretrained, individual and data-free models (``before`` / ``after``: cells of the caller's
    own columns around the accuracy pair)."""
    individual = static["individual"]["average_accuracy"]
    return [f"| {m} | – | – |{before} {100 * static[m]['average_accuracy']:.1f} | "
            f"{100 * static[m]['average_accuracy'] / individual:.1f} |{after} {static[m]['seconds']:.1f} | "
            f"{static[m]['peak_memory_mb']:.0f} |" for m in STATIC]


def table(results: dict, seeds: list[int]) -> str:
    lines = []
    for zoo, parts in results.items():
        static, learned = parts["static"], parts["learned"]
        individual = static["individual"]["average_accuracy"]
        best_static = max(DATA_FREE, key=lambda m: static[m]["average_accuracy"])
        lines += [f"### Zoo `{zoo}` ({', '.join(static['pretrained']['tasks'])}; seeds {seeds})", "",
                  "| row | objective | base | average accuracy | normalised | seconds | peak MB |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += static_lines(static)
        ranked = sorted(learned.items(), key=lambda item: -statistics.mean(r["average_accuracy"] for r in item[1]))
        for (method, objective, base), rows in ranked:
            accuracy = [r["average_accuracy"] for r in rows]
            lines.append(f"| {method} | {objective} | {base} | {mean_std(accuracy)}{seeds_note(rows, seeds)} | "
                         f"{mean_std([a / individual for a in accuracy])} | "
                         f"{statistics.mean(r['seconds'] for r in rows):.0f} | "
                         f"{statistics.mean(r['peak_memory_mb'] for r in rows):.0f} |")
        if ranked:
            (method, objective, base), rows = ranked[0]
            gap = statistics.mean(r["average_accuracy"] for r in rows) - static[best_static]["average_accuracy"]
            lines += ["", f"Best learned row: {method} / {objective} / {base}, {100 * gap:+.1f} points against the best "
                      f"data-free row ({best_static}, {100 * static[best_static]['average_accuracy']:.1f}).", ""]
    return "\n".join(lines)


def compact(results: dict, seeds: list[int]) -> str:
    """The docs block's summary (docs/methods.md): per zoo, the best data-free row and each learned cell against it."""
    lines = ["| zoo | row | objective | base | average accuracy | normalised | vs best data-free |",
             "|---|---|---|---|---:|---:|---:|"]
    for zoo, parts in results.items():
        static, learned = parts["static"], parts["learned"]
        individual = static["individual"]["average_accuracy"]
        best = max(DATA_FREE, key=lambda m: static[m]["average_accuracy"])
        best_value = static[best]["average_accuracy"]
        lines.append(f"| {zoo} | individual models | – | – | {100 * individual:.1f} | 100.0 | |")
        lines.append(f"| {zoo} | {best} (best data-free) | – | – | {100 * best_value:.1f} | "
                     f"{100 * best_value / individual:.1f} | |")
        for (method, objective, base), rows in sorted(learned.items(), key=lambda i: -statistics.mean(
                r["average_accuracy"] for r in i[1])):
            accuracy = [r["average_accuracy"] for r in rows]
            lines.append(f"| {zoo} | {method} | {objective} | {base} | {mean_std(accuracy)}{seeds_note(rows, seeds)} | "
                         f"{mean_std([a / individual for a in accuracy])} | "
                         f"{100 * (statistics.mean(accuracy) - best_value):+.1f} |")
    verdicts = [verdict(zoo, parts, seeds) for zoo, parts in results.items() if parts["learned"]]
    return ("\n".join(lines) + f"\n\nMean ± std over seeds {seeds}; 100 steps; normalised = merged ÷ individual models (%)."
            + "".join(f" {v}" for v in verdicts))


def verdict(zoo: str, parts: dict, seeds: list[int]) -> str:
    """Whether the best learned row beats the best data-free row by the study's bar (issue 22: at least 1 point, mean
    over seeds), said plainly."""
    static = parts["static"]
    best = max(DATA_FREE, key=lambda m: static[m]["average_accuracy"])
    (method, objective, base), rows = max(parts["learned"].items(), key=lambda i: statistics.mean(
        r["average_accuracy"] for r in i[1]))
    gap = 100 * (statistics.mean(r["average_accuracy"] for r in rows) - static[best]["average_accuracy"])
    met = "meets" if gap >= BAR else "does not meet"
    return (f"Zoo `{zoo}`: the best learned row ({method}, {objective}, base {base}{seeds_note(rows, seeds)}) is "
            f"{gap:+.1f} points against the best data-free row ({best}): it {met} the {BAR:.0f}-point bar.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoos", nargs="+", default=DEFAULT_ZOOS, choices=list(ZOOS))
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    parser.add_argument("--bases", nargs="+", default=BASES)
    parser.add_argument("--methods", nargs="+", default=["adamerging_layer_wise"],
                        help="learned methods run on every base; method@base: on that base only")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="key=value hyperparameters of every learned method, e.g. lr=0.01; key=value@base: on that base only")
    parser.add_argument("--variant", nargs="*", default=[], help="key=value[,key=value] groups: each also runs as "
                        "its own cell next to the plain one, e.g. --variant mask_lr=0.01 mask_lr=0.1 (a step-size study)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 torch thread each)")
    parser.add_argument("--runs", type=Path, default=ROOT / "bench" / "runs" / "learned_study", help="run dirs (not committed)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("ADAMERGE_CACHE_DIR", ROOT / "bench" / "runs" / "cache")))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learned_study")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing: write the tables from the runs there are (rows short of seeds say so)")
    parser.add_argument("--readme", action="store_true", help="also rewrite the learned-study block of docs/methods.md "
                        "(learned-study-text for --zoos text: the transformer zoo's study is run on its own)")
    parser.add_argument("--methods-block", action="store_true", help="with --readme: rewrite the learned-study-methods "
                        "block instead (the study of every learned method on one base)")
    parser.add_argument("--recommended-block", action="store_true", help="with --readme: rewrite the "
                        "learned-study-recommended block instead (the recommended method's objective, base, step size)")
    args = parser.parse_args()

    start = time.perf_counter()
    failed: list[str] = []
    if not args.collect_only:
        build_zoos(args.zoos, args.cache)
        # The static rows: one run per zoo.
        jobs = [(z, static_seed(args.runs, z, args.seeds), None, None, args.set) for z in args.zoos]
        # A cell's seeds one after another: a study cut short leaves whole cells (every seed), not one seed of each.
        jobs += [(z, s, o, b, group) for z in args.zoos for o in args.objectives for b in args.bases
                 for group in setting_groups(args) for s in args.seeds]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            failed = [f for f in pool.map(lambda job: failure(job, args), jobs) if f]
    results = collect(args)
    text = table(results, args.seeds)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    header = (f"# Learned-merging study\n\nGenerated by `python bench/learned_study.py {' '.join(sys.argv[1:])}`".rstrip()
              + f" on {machine}; each run one process with 1 torch thread, {args.jobs} side by side (the seconds include "
              f"sharing the cores); this invocation {(time.perf_counter() - start) / 60:.0f} min, finished runs reused. "
              "Average accuracy (%) over the zoo's tasks after 100 steps, mean ± std over seeds; normalised = merged ÷ "
              "individual models (%). Data-free rows are deterministic (one run).\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(header + text)
    raw = {zoo: {"static": {m: {k: r[k] for k in ("average_accuracy", "accuracy", "seconds", "peak_memory_mb")}
                            for m, r in parts["static"].items()},
                 "learned": [{"method": m, "objective": o, "base": b,
                              "runs": [{k: r[k] for k in ("seed", "average_accuracy", "accuracy", "seconds", "peak_memory_mb")}
                                       for r in rows]} for (m, o, b), rows in parts["learned"].items()]}
           for zoo, parts in results.items()}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, sort_keys=True))
    print(header + text)
    if args.readme:
        from adamerge.reporting.results import replace_marked_block

        command = " ".join(["python bench/learned_study.py", *sys.argv[1:]])
        block = (f"Generated by `{command}` ({machine}); the full table, with seconds and peak memory per run, is in "
                 f"{args.out.with_suffix('.md').resolve().relative_to(ROOT)}.\n\n" + compact(results, args.seeds))
        if args.recommended_block:
            replace_marked_block(PAGE, "learned-study-recommended", block)
        elif args.methods_block:
            replace_marked_block(PAGE, "learned-study-methods", block)
        elif args.zoos == ["text"]:
            replace_marked_block(PAGE, "learned-study-text", block)
        else:
            replace_marked_block(PAGE, "learned-study", block)
    if failed:  # the tables above hold every run that finished; the failed jobs' cells say they lack seeds
        sys.exit(f"{len(failed)} of {len(jobs)} jobs failed: {', '.join(failed)}")


def failure(job: tuple, args: argparse.Namespace) -> str | None:
    """Run one job; on failure say so at once (stderr) and return its cell's name, so the other jobs go on -- they
    write other run directories -- and the study still ends with the runs that finished."""
    try:
        run_job(*job[:4], args.methods, args.runs, args.cache, job[4])
    except JobFailed as error:
        print(error, file=sys.stderr, flush=True)
        return error.job
    return None


if __name__ == "__main__":
    main()
