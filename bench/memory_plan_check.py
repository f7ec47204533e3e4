"""The memory plan against the measured peak resident memory of real learning on CPU, for tiny Llama pools.

For each pool size: random Llama checkpoints are written with save_pretrained (θ0 and K perturbed copies), the plan
is made from their safetensors headers and config.json (what preflight does), and a fresh process loads the pool,
stacks the task vectors, builds layer-wise AdaMerging and runs one learning step (forward, entropy, backward, Adam)
on a batch of ``batch × seq`` tokens per task. That process resets its peak-RSS counter (``/proc/self/clear_refs``)
after its imports and a warm-up step on a minuscule model, and reports ``VmHWM`` minus the resident memory at that
point: the memory the run itself added. Writes bench/results/memory_plan_check.{json,md} (and the ``memory-plan-check`` block of docs/performance.md).

    python bench/memory_plan_check.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "performance.md"  # the page holding this script's generated block
RESULTS = ROOT / "bench" / "results"
TOLERANCE = 0.15  # the plan against the measured peak (the issue asks for 15 %)
TASKS = ("alpha", "beta", "gamma", "delta")
# name: (hidden, intermediate, layers, vocab, tasks, storage dtype, batch, sequence)
SIZES = {
    "small": (128, 344, 4, 4096, 3, "float32", 4, 64),
    "medium": (256, 688, 6, 8192, 4, "bfloat16", 4, 128),
    "large": (512, 1376, 6, 16384, 3, "float32", 4, 128),
}


def build_pool(root: Path, hidden: int, intermediate: int, layers: int, vocab: int, tasks: int) -> dict[str, Path]:
    """θ0 and ``tasks`` fine-tuned copies (θ0 plus seeded noise), float32 safetensors."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "pretrained")
    paths = {"pretrained": root / "pretrained"}
    for k, task in enumerate(TASKS[:tasks]):
        generator = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            tuned = {n: p + 0.01 * torch.randn(p.shape, generator=generator) for n, p in model.state_dict().items()}
        copy = transformers.AutoModelForCausalLM.from_config(config)
        copy.load_state_dict(tuned)
        copy.save_pretrained(root / task)
        paths[task] = root / task
    return paths


def planned(paths: dict[str, Path], storage: str, batch: int, sequence: int) -> dict:
    from adamerge.cli.run_memory import plan_for_pool

    finetuned = {task: path for task, path in paths.items() if task != "pretrained"}
    plan, _, _ = plan_for_pool(paths["pretrained"], finetuned, auto_class="AutoModelForCausalLM",
                               storage_dtype=storage, batch_size=batch, sequence_length=sequence, on_device=False)
    return plan.to_json()


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(paths: dict[str, str], storage: str, batch: int, sequence: int) -> dict:
    """In this process: the peak resident memory that loading and one learning step add."""
    import torch
    import transformers

    from adamerge.methods.learned.adamerging import build_learned
    from adamerge.backbones.heads import Identity
    from adamerge.backbones.hf_checkpoints import HFModelPool
    from adamerge.pool.task_vectors import TaskVectors

    torch.set_num_threads(1)
    tasks = [task for task in paths if task != "pretrained"]

    def pool_of(pretrained: str, finetuned: dict[str, str]) -> HFModelPool:
        return HFModelPool(backbone={"_target_": "adamerge.backbones.hf.causal_lm", "model": pretrained},
                           finetuned=finetuned, heads={t: Identity() for t in finetuned}, pretrained=pretrained,
                           storage_dtype=storage, auto_class="AutoModelForCausalLM")

    def learn_once(pool: HFModelPool, vectors: TaskVectors, vocab: int, length: int) -> None:
        module = build_learned("adamerging_layer_wise", pool.shared_backbone(), vectors, pool.heads, layer_groups="block")
        optimizer = module.configure_optimizers()
        generator = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, vocab, (batch, length), generator=generator),
                  "attention_mask": torch.ones(batch, length, dtype=torch.long)}
        module.accumulate_gradients({task: {"inputs": inputs} for task in pool.task_names}, module.merged_weights())
        optimizer.step()

    with tempfile.TemporaryDirectory() as warm:  # imports, lazy modules and allocator pools, before the baseline
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(warm)
        warm_pool = pool_of(warm, {t: warm for t in tasks})
        learn_once(warm_pool, warm_pool.task_vectors(), 64, 8)
        del warm_pool
    reset_peak()
    baseline = _rss("VmRSS")
    pool = pool_of(paths["pretrained"], {t: paths[t] for t in tasks})
    vectors = pool.task_vectors()
    loading = _rss("VmHWM") - baseline
    reset_peak()
    vocab = json.loads((Path(paths["pretrained"]) / "config.json").read_text())["vocab_size"]
    learn_once(pool, vectors, vocab, sequence)
    step = _rss("VmHWM") - baseline
    return {"baseline_bytes": baseline, "loading_bytes": loading, "step_bytes": step, "peak_bytes": max(loading, step)}


def reset_peak() -> None:
    """Set this process's peak resident memory (VmHWM) to its current resident memory."""
    Path("/proc/self/clear_refs").write_text("5")


def check_size(name: str, root: Path) -> dict:
    """Plan and measurement of one pool size (the measurement in a fresh process)."""
    hidden, intermediate, layers, vocab, tasks, storage, batch, sequence = SIZES[name]
    paths = build_pool(root / name, hidden, intermediate, layers, vocab, tasks)
    plan = planned(paths, storage, batch, sequence)
    command = [sys.executable, __file__, "--measure", json.dumps({k: str(v) for k, v in paths.items()}),
               storage, str(batch), str(sequence)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    measured = json.loads(output.strip().splitlines()[-1])
    return {"size": name, "hidden": hidden, "layers": layers, "vocab": vocab, "tasks": tasks, "storage": storage,
            "batch": batch, "sequence": sequence, "planned_bytes": plan["host_peak"], "plan": plan,
            "measured_bytes": measured["peak_bytes"], "measured": measured, "ratio": plan["host_peak"] / measured["peak_bytes"]}


def render(rows: list[dict]) -> str:
    lines = ["| pool | K | storage | batch × seq | planned peak (MB) | measured peak RSS (MB) | planned / measured |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| Llama h={r['hidden']}, {r['layers']} layers, vocab {r['vocab']} | {r['tasks']} | {r['storage']} "
                     f"| {r['batch']} × {r['sequence']} | {r['planned_bytes'] / 2**20:.0f} | "
                     f"{r['measured_bytes'] / 2**20:.0f} | {r['ratio']:.3f} |")
    lines.append("\nGenerated by `python bench/memory_plan_check.py`: plan from the safetensors headers and config.json; "
                 "measured in a fresh process per pool as the peak resident memory (VmHWM) above the resident set after "
                 "imports and a warm-up, for loading the pool, stacking the task vectors and one layer-wise AdaMerging "
                 "step on CPU (one thread).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--measure", nargs=4, metavar=("PATHS", "STORAGE", "BATCH", "SEQUENCE"))
    args = parser.parse_args()
    if args.measure:
        paths, storage, batch, sequence = args.measure
        print(json.dumps(measure(json.loads(paths), storage, int(batch), int(sequence))))
        return
    from adamerge.reporting.results import replace_marked_block, write_json

    with tempfile.TemporaryDirectory() as root:
        rows = [check_size(name, Path(root)) for name in args.sizes.split(",")]
    for row in rows:
        print(row["size"], f"planned {row['planned_bytes'] / 2**20:.0f} MB, measured {row['measured_bytes'] / 2**20:.0f} MB",
              {k: round(v / 2**20) for k, v in row["measured"].items()})
    write_json(RESULTS / "memory_plan_check.json", {"rows": rows})
    block = render(rows)
    (RESULTS / "memory_plan_check.md").write_text(block + "\n")
    print(block)
    if "<!-- memory-plan-check:start -->" in PAGE.read_text():
        replace_marked_block(PAGE, "memory-plan-check", block)
    # The bound: the plan within 15 % of the measured peak, or the check fails (written first, to be read).
    off = [f"{row['size']}: planned / measured {row['ratio']:.3f}" for row in rows if abs(row["ratio"] - 1) > TOLERANCE]
    if off:
        sys.exit(f"memory plan off by more than {TOLERANCE:.0%}: " + "; ".join(off))


if __name__ == "__main__":
    main()
