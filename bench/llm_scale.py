"""Learned merging on a Qwen2.5-0.5B-shaped causal LM, on CPU: peak memory and seconds per step of the command.

Long because: one benchmark -- the commands it runs, the probe inside them, collecting and rendering their figures.

The pool (bench/llm_scale_pool.py: the real Qwen2.5-0.5B config with seeded random weights, K fine-tunes as full
checkpoints and as PEFT LoRA adapters, generated text, a local tokenizer) is written once under ``--work`` and
reused. Every row is one ``adamerge`` command with a generated ``--config-dir`` (conf/modelpool/, conf/data/), run
in a fresh process: ``python bench/llm_scale.py --cli <args>`` runs ``adamerge.cli.main`` as the ``adamerge`` script
does, with one Lightning callback added to the learning trainer that resets the process's peak resident memory
(VmHWM, through /proc/self/clear_refs) when learning starts and reads it when learning ends, and times every step.
The run's own results.json gives the whole command's peak (``peak_memory_mb``: its ``ru_maxrss``: imports,
loading, evaluations) and its step profile.

Rows: (a) in-memory layer-wise AdaMerging end-to-end, (b) the same with ``modelpool.streaming=disk`` (merged module
by module; the tasks' batches in one forward, or one task at a time), (c) progressive
distillation with ``modelpool.streaming=disk``, (d) layer-wise AdaMerging over the LoRA pool (kept factored); the
streamed rows at K = 2, 4 and 8 (whether the peak grows with K). Next to each, the memory plan (adamerge/pool/memory_plan.py) of that run.
Writes bench/results/llm_scale.{json,md}, the ``llm-scale-table`` block of docs/performance.md and the short
``llm-scale`` block of README.md.

    nice -n 5 python bench/llm_scale.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from llm_scale_pool import SHAPES, TASKS, build_pool  # noqa: E402  (sibling scripts)
from memory_plan_check import _rss, reset_peak  # noqa: E402
from readme_demo import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "performance.md"  # the page holding this script's table
# name: (pool kind, modelpool.streaming, method, extra overrides)
ROWS = {
    "in-memory": ("full", False, "adamerging_layer_wise", ()),
    # Merged module by module: the tasks' batches in one forward (task_batching=auto), the merge made once a step ...
    "streamed": ("full", "disk", "adamerging_layer_wise", ()),
    # ... or one task at a time (task_batching=sequential, the default): one task's activations, the merge K times.
    "streamed-sequential": ("full", "disk", "adamerging_layer_wise", ("task_batching=sequential",)),
    # One coefficient per task and tensor: what learns is K numbers per tensor.
    "progressive": ("full", "disk", "progressive_distillation", ("method.granularity=tensor",)),
    # The authors' element-wise coefficients: K × one block's parameters learn at a time, in float32.
    "progressive-element": ("full", "disk", "progressive_distillation", ("method.granularity=element",)),
    "lora": ("lora", False, "adamerging_layer_wise", ()),
    # The streamed rows again with activation checkpointing: each decoder layer keeps its input only and runs again,
    # with its merge, in the backward.
    "streamed-checkpointed": ("full", "disk", "adamerging_layer_wise", ("activation_checkpointing=true",)),
    "streamed-sequential-checkpointed": ("full", "disk", "adamerging_layer_wise",
                                         ("task_batching=sequential", "activation_checkpointing=true")),
    # The LoRA pool one task at a time with activation checkpointing (its linear layers merge themselves, as a
    # streamed pool's do).
    "lora-sequential-checkpointed": ("lora", False, "adamerging_layer_wise",
                                     ("task_batching=sequential", "activation_checkpointing=true")),
}
GOAL = 1.5  # the target for streamed and progressive learning: peak below 1.5 × one model
WARM_UP = 1  # AdaMerging steps left out of s / step (the first allocates the optimiser and the allocator's pools)


class LearningProbe:
    """A Lightning callback (built lazily: Lightning is imported in the measured process only) that resets the peak
    resident memory when learning starts and writes the peak and each step's seconds to ``out`` when it ends."""

    def __new__(cls, out: str):
        import lightning as L

        class _Probe(L.Callback):
            def on_fit_start(self, trainer, module) -> None:
                reset_peak()
                self.before, self.seconds = _rss("VmRSS"), []

            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                self.seconds.append(time.perf_counter() - self.start)

            def on_fit_end(self, trainer, module) -> None:
                Path(out).write_text(json.dumps({"learning_peak_bytes": _rss("VmHWM"), "before_learning_bytes": self.before,
                                                 "step_seconds": self.seconds}))

        return _Probe()


def run_cli(arguments: list[str], out: str) -> None:
    """``adamerge <arguments>`` in this process, with :class:`LearningProbe` on the learning trainer."""
    from adamerge.cli import main as cli_main
    from adamerge.cli import method_runs

    imports = _rss("VmRSS")
    Path(out + ".imports").write_text(str(imports))
    original = method_runs.make_trainer

    def make_trainer(ctx, name, logger, callbacks=None, max_steps=None):
        return original(ctx, name, logger, [*(callbacks or []), LearningProbe(out)], max_steps)

    method_runs.make_trainer = make_trainer
    sys.argv = ["adamerge", *arguments]
    cli_main.main()


def write_configs(conf: Path, paths: dict[str, Path], tasks: list[str], batch: int, length: int) -> None:
    """conf/modelpool/llm_{full,lora}_k<K>.yaml and conf/data/llm_k<K>.yaml for ``--config-dir``."""
    import yaml

    k = len(tasks)
    for kind in ("full", "lora"):
        pool = {
            "_target_": "adamerge.backbones.hf_checkpoints.HFModelPool", "auto_class": "AutoModelForCausalLM",
            "pretrained": str(paths["pretrained"]), "storage_dtype": "bfloat16", "streaming": False,
            "backbone": {"_target_": "adamerge.backbones.hf.causal_lm", "model": "${modelpool.pretrained}",
                         "dtype": "float32"},
            "finetuned": {t: str(paths[f"{kind}_{t}"]) for t in tasks},
            "heads": {t: {"_target_": "adamerge.backbones.heads.Identity"} for t in tasks},
        }
        (conf / "modelpool").mkdir(parents=True, exist_ok=True)
        (conf / "modelpool" / f"llm_{kind}_k{k}.yaml").write_text(yaml.safe_dump(pool, sort_keys=False))
    preprocessor = {"_target_": "adamerge.backbones.hf.PromptPreprocessor", "tokenizer": str(paths["pretrained"]),
                    "text_column": "text", "max_length": length}
    data = {"_target_": "adamerge.backbones.hf.PromptDataModule", "batch_size": batch, "eval_batch_size": 4,
            "num_workers": 0, "seed": "${seed}",
            "tasks": {t: {"path": str(paths["data"] / t), "split": "test", "max_eval_samples": 2,
                          "preprocessor": preprocessor} for t in tasks}}
    (conf / "data").mkdir(parents=True, exist_ok=True)
    (conf / "data" / f"llm_k{k}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def command(conf: Path, run_dir: Path, row: str, k: int, steps: int, threads: int) -> list[str]:
    kind, streaming, method, extra = ROWS[row]
    arguments = [f"--config-dir={conf}", f"modelpool=llm_{kind}_k{k}", f"data=llm_k{k}", f"method={method}",
                 "objective=entropy", "trainer=cpu", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
                 "logger=none", "export.enabled=false", "checkpoint.every_n_steps=0", f"num_threads={threads}",
                 f"modelpool.streaming={str(streaming).lower()}", f"hydra.run.dir={run_dir}", *extra]
    if not any(e.startswith("task_batching=") for e in extra):  # a streamed merge once a step; sequential otherwise
        arguments.append("task_batching=auto")
    if method == "adamerging_layer_wise":
        arguments.append("method.layer_groups=block")  # one row per decoder block, as the causal-LM experiment
    else:  # a short ProDistill: every block once, a few cached inputs per task
        arguments += ["method.steps_per_block=2", "method.samples_per_task=4", "method.batch_size=4"]
    return arguments


def planned(paths: dict[str, Path], row: str, tasks: list[str], batch: int, length: int) -> dict:
    """The memory plan of this row's run: what the command's preflight prints (adamerge/cli/run_memory.py)."""
    from adamerge.cli.run_memory import learned_working_set, plan_for_pool, runs_tasks_jointly

    kind, streaming, method, extra = ROWS[row]
    finetuned = {t: paths[f"{kind}_{t}"] for t in tasks}
    batching = "sequential" if "task_batching=sequential" in extra else "auto"  # as command() sets it
    settings = dict(e.removeprefix("method.").split("=", 1) for e in extra if e.startswith("method."))
    working_set, element = learned_working_set([method], {method: settings})
    joint = working_set == "end_to_end" and runs_tasks_jointly(batching, streaming or None, finetuned)
    plan, _, _ = plan_for_pool(paths["pretrained"], finetuned, auto_class="AutoModelForCausalLM",
                               backbone_dtype="float32", storage_dtype="bfloat16", batch_size=batch,
                               sequence_length=length, streaming=streaming or None,
                               tasks_per_step=len(tasks) if joint else 1,
                               activation_checkpointing="activation_checkpointing=true" in extra,
                               working_set=working_set, element_coefficients=element)
    return {"host_peak_bytes": plan.host_peak, "host": plan.host}


def measure_row(conf: Path, work: Path, row: str, k: int, steps: int, threads: int) -> dict:
    """One command in a fresh process, then what it measured (:func:`collect_row`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    with open(work / f"{row}_k{k}.log", "w") as log:
        code = subprocess.run([sys.executable, __file__, "--cli", str(work / f"{row}_k{k}.probe.json"), "--",
                               *command(conf, work / f"{row}_k{k}", row, k, steps, threads)],
                              stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"row {row} K={k} failed (exit {code}): see {log.name}")
    return collect_row(work, row, k)


def collect_row(work: Path, row: str, k: int) -> dict:
    """A finished row's figures: the probe's (learning peak, step times) and the run's results.json (the whole
    command's peak resident memory, its step profile)."""
    probe = work / f"{row}_k{k}.probe.json"
    seen = json.loads(probe.read_text())
    result = json.loads(next((work / f"{row}_k{k}").rglob("results.json")).read_text())
    method = ROWS[row][2]
    if result.get("method") != method:
        raise RuntimeError(f"{work / f'{row}_k{k}'}: results.json is of {result.get('method')!r}, not {method!r}")
    warm = WARM_UP if method == "adamerging_layer_wise" else 0
    timed = seen["step_seconds"][warm:]
    return {"row": row, "tasks": k, "method": method, "streaming": ROWS[row][1], "pool": ROWS[row][0],
            "command_seconds": result["seconds"], "command_peak_bytes": int(result["peak_memory_mb"] * 2**20),
            "imports_bytes": int(Path(str(probe) + ".imports").read_text()),
            "before_learning_bytes": seen["before_learning_bytes"], "learning_peak_bytes": seen["learning_peak_bytes"],
            "steps": len(seen["step_seconds"]), "timed_steps": len(timed), "seconds_per_step": sum(timed) / len(timed),
            "profile_ms_per_step": {p: v["ms_per_step"] for p, v in (result.get("profile") or {}).items()}}


def render_table(rows: list[dict], meta: dict) -> str:
    gb = 2**30
    size = meta["model_fp32_bytes"]
    imports = max(r["imports_bytes"] for r in rows)
    command = (f"python bench/llm_scale.py --steps {meta['steps']} --rows "
               + ",".join(f"{r['row']}:{r['tasks']}" for r in rows))
    lines = ["| run | K | learning peak RSS (GiB) | × one model (fp32) | above the imports, × one model "
             "| resident when learning starts (GiB) | command peak (GiB) | planned peak (GiB) | s / step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {meta['labels'][r['row']]} | {r['tasks']} | {r['learning_peak_bytes'] / gb:.2f} | "
                     f"{r['learning_peak_bytes'] / size:.2f} | {above_imports(r) / size:.2f} "
                     f"| {r['before_learning_bytes'] / gb:.2f} "
                     f"| {r['command_peak_bytes'] / gb:.2f} | {r['planned']['host_peak_bytes'] / gb:.2f} | "
                     f"{r['seconds_per_step']:.0f} |")
    lines.append(
        f"\nPool: Qwen2.5-0.5B's config (hidden {meta['hidden']}, {meta['layers']} layers, 14 heads / 2 KV heads, "
        f"intermediate {meta['intermediate']}, vocab {meta['vocab']}, tied embeddings; {meta['parameters'] / 1e6:.0f} M "
        f"parameters) with seeded random weights, stored in bfloat16 as Qwen2.5 is ({meta['model_disk_bytes'] / gb:.2f} "
        f"GB per checkpoint on disk; {size / gb:.2f} GB in float32, the dtype the backbone learns in, which the "
        f"× column divides by). K fine-tunes: a seeded rank-{meta['lora_rank']} update on every attention and MLP "
        "matrix, as full checkpoints (θ0 + B·A merged) and as the PEFT adapters themselves (the LoRA row). Task vectors "
        f"in bfloat16 (`modelpool.storage_dtype`). Batch: {meta['batch']} sequences of ≤ {meta['length']} tokens per "
        f"task, entropy objective, layer-wise coefficients per decoder block; ProDistill 2 steps per block over 4 cached "
        "inputs per task, with one coefficient per task and tensor (`method.granularity=tensor`) or the authors' one "
        "per task and element (`element`, the default: K × one block's parameters learn at a time, in float32). Streamed rows merge "
        "module by module (`adamerge/methods/learned/merged_per_module.py`), with the tasks' batches in one forward "
        "(`task_batching=auto`) or one task at a time (`task_batching=sequential`, the default). Learning peak: the "
        "process's VmHWM from the start to the end of learning (reset at its start), absolute, imports included "
        f"({imports / gb:.2f} GiB); above the imports: that peak less the resident set after the imports (Python, "
        "torch, transformers, Lightning -- the same for any model), in units of one model; resident when "
        "learning starts: the resident set then (θ0, the data, the experts' cached outputs, and whatever loading and the "
        "evaluation before learning left with the allocator); command peak: the whole command's maximum RSS (loading, the "
        "evaluations before and after); planned peak: the run's memory plan (`adamerge/pool/memory_plan.py`, from the "
        "checkpoints' headers before anything loads), which leaves the imports out -- compare it with the peak above "
        "the imports. s / step: mean wall time of the learning steps after one warm-up step "
        f"(ProDistill: of all its block steps, block preparation included; AdaMerging: {meta['steps']} steps, the first "
        f"left out). Generated by `nice -n 5 {command}` on {meta['machine']}, {meta['threads']} torch threads, one fresh "
        "process per row (seconds depend on what else runs on the machine; peaks do not).")
    absent = [meta["labels"][name] for name in ROWS if name not in {r["row"] for r in rows}]
    if absent:
        lines.append(f"\nNot measured in this run: {'; '.join(absent)}.")
    lines.append("\n" + goal_verdict(rows, meta))
    return "\n".join(lines)


def above_imports(row: dict) -> int:
    """The learning peak less what the process held after its imports (Python, torch, transformers, Lightning: the
    same for any model): the memory learning this model takes."""
    return row["learning_peak_bytes"] - row["imports_bytes"]


def goal_verdict(rows: list[dict], meta: dict) -> str:
    size = meta["model_fp32_bytes"]
    goal = [r for r in rows if r["row"].startswith(("streamed", "progressive"))]

    def names(test) -> str:
        return "; ".join(f"{meta['labels'][r['row']]} K = {r['tasks']}" for r in goal if test(r)) or "no row"

    return (f"Goal, a streamed or progressive learning peak below {GOAL} × one float32 model: above the imports, met "
            f"by {names(lambda r: above_imports(r) < GOAL * size)}, missed by "
            f"{names(lambda r: above_imports(r) >= GOAL * size)}; counting the imports too, met by "
            f"{names(lambda r: r['learning_peak_bytes'] < GOAL * size)}.")


def render_readme(rows: list[dict], meta: dict) -> str:
    size = meta["model_fp32_bytes"]
    largest: dict[str, dict] = {}  # each kind of run at its largest K
    for r in rows:
        if r["tasks"] >= largest.get(r["row"], {"tasks": 0})["tasks"]:
            largest[r["row"]] = r
    parts = [f"{meta['labels'][name]}, K = {r['tasks']}: {r['learning_peak_bytes'] / 2**30:.2f} GiB "
             f"({r['learning_peak_bytes'] / size:.2f}×), {r['seconds_per_step']:.0f} s/step" for name, r in largest.items()]
    return (f"Learning on a Qwen2.5-0.5B-shaped LM, CPU (peak RSS, × one float32 model of {size / 2**30:.2f} GiB; each "
            "kind of run at the largest K measured): " + "; ".join(parts) + f". {goal_verdict(rows, meta)} Generated by "
            "`bench/llm_scale.py`; every row, where the memory goes and the memory plan in "
            "[Performance](docs/performance.md#learning-on-a-qwen25-05b-shaped-model).")


def publish(rows: list[dict], meta: dict) -> str:
    from adamerge.reporting.results import replace_marked_block

    rows = sorted(rows, key=lambda r: (list(ROWS).index(r["row"]), r["tasks"]))  # ROWS' order, then K
    table = render_table(rows, meta)
    (RESULTS / "llm_scale.md").write_text(table + "\n")
    replace_marked_block(PAGE, "llm-scale-table", table)
    replace_marked_block(ROOT / "README.md", "llm-scale", render_readme(rows, meta))
    return table


LABELS = {"in-memory": "in memory", "streamed": "streamed (disk), tasks in one batch",
          "streamed-sequential": "streamed (disk), one task at a time", "progressive": "progressive, streamed (disk)",
          "progressive-element": "progressive element-wise, streamed (disk)", "lora": "LoRA pool (factored)",
          "streamed-checkpointed": "streamed (disk), tasks in one batch, activation checkpointing",
          "streamed-sequential-checkpointed": "streamed (disk), one task at a time, activation checkpointing",
          "lora-sequential-checkpointed": "LoRA pool (factored), one task at a time, activation checkpointing"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "adamerge" / "llm_scale")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--rows", help="row:K pairs",
                        default="in-memory:4,streamed:2,streamed:4,streamed-sequential:4,progressive:2,progressive:4,"
                                "progressive-element:2,lora:4")
    parser.add_argument("--steps", type=int, default=4, help="learning steps of AdaMerging rows (1 warm-up)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="rewrite the blocks from llm_scale.json")
    parser.add_argument("--append", action="store_true", help="add these rows to llm_scale.json's (same pool; a row measured again replaces its old figures)")
    parser.add_argument("--collect", type=Path, help="a runs directory of this script: take its finished --rows from "
                        "there instead of running them (a bench interrupted after a row)")
    args, rest = parser.parse_known_args()
    if args.cli:
        run_cli([a for a in rest if a != "--"], args.cli)
        return
    from adamerge.reporting.results import write_json

    if args.render:  # the measured rows as saved; their plans worked out again (from headers: the plan's code now)
        saved = json.loads((RESULTS / "llm_scale.json").read_text())
        paths = build_pool(args.work / saved["meta"]["shape"], saved["meta"]["shape"], len(TASKS))
        for row in saved["rows"]:
            row["planned"] = planned(paths, row["row"], list(TASKS[:row["tasks"]]), saved["meta"]["batch"],
                                     saved["meta"]["length"])
        write_json(RESULTS / "llm_scale.json", saved)
        print(publish(saved["rows"], saved["meta"]))
        return
    from adamerge.pool.inventory import checkpoint_inventory
    from llm_scale_pool import LORA_RANK, model_bytes

    wanted = [(name, int(k)) for name, k in (item.split(":") for item in args.rows.split(","))]
    unknown = sorted({name for name, _ in wanted} - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown rows {unknown}; known: {sorted(ROWS)}")
    pool_dir = args.work / args.shape
    paths = build_pool(pool_dir, args.shape, len(TASKS))  # every row reads the first K of the same 8 fine-tunes
    inventory = checkpoint_inventory(paths["pretrained"], "AutoModelForCausalLM")
    parameters = sum(spec.numel for spec in inventory.values())
    shape = SHAPES[args.shape]
    meta = {"machine": f"{os.cpu_count()} cores of an {cpu_name()} ({platform.machine()}), no GPU, Python "
                       f"{platform.python_version()}", "shape": args.shape, "hidden": shape["hidden_size"],
            "layers": shape["num_hidden_layers"], "intermediate": shape["intermediate_size"], "vocab": 151936,
            "parameters": parameters, "model_fp32_bytes": 4 * parameters,
            "model_disk_bytes": model_bytes(paths["pretrained"]), "lora_rank": LORA_RANK, "batch": args.batch,
            "length": args.length, "threads": args.threads, "steps": args.steps, "labels": LABELS}
    rows = json.loads((RESULTS / "llm_scale.json").read_text())["rows"] if args.append else []
    # Kept: each row's log and run directory.
    work = args.collect or pool_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    conf = work / "conf"
    for k in sorted({k for _, k in wanted}):
        write_configs(conf, paths, list(TASKS[:k]), args.batch, args.length)
    for name, k in wanted:
        row = collect_row(args.collect, name, k) if args.collect else measure_row(conf, work, name, k, args.steps,
                                                                                    args.threads)
        row["planned"] = planned(paths, name, list(TASKS[:k]), args.batch, args.length)
        # A row measured again replaces the earlier one (e.g. remeasured on a quieter machine).
        rows = [r for r in rows if (r["row"], r["tasks"]) != (name, k)] + [row]
        print(json.dumps(row), flush=True)
        write_json(RESULTS / "llm_scale.json", {"meta": meta, "rows": rows})  # after every row: --render any time
    print(publish(rows, meta))


if __name__ == "__main__":
    main()
