"""Peak memory and time of streamed task vectors (modelpool.streaming) against the in-memory pool, on CPU.

A Llama-shaped pool is written with save_pretrained (θ0 and K fine-tuned copies, float32 safetensors; bench/
memory_plan_check.build_pool). Each measurement runs in a fresh process: imports and a warm-up first, then the peak
resident memory (VmHWM, reset through /proc/self/clear_refs) above the resident set at that point, over

* ``merge``: building the pool, forming the task vectors, a data-free merge and the merged state dict;
* ``learn``: building the pool and the task vectors, layer-wise AdaMerging (one row per block) and ``steps`` learning
  steps (forward over every task's batch, entropy, backward, Adam) on random tokens.

Modes: ``memory`` (today's pool: every checkpoint loaded, K stacked task vectors), ``disk`` (streamed, read from the
memory-mapped checkpoints at every use), ``host`` (streamed, formed once and kept on the host). Mapped file pages
count in the resident set while a tensor holds them, so the streamed figures include the slices being read.
Writes bench/results/streaming.{json,md}.

    nice -n 10 python bench/streaming.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from memory_plan_check import _rss, build_pool, reset_peak  # noqa: E402  (sibling script)
from readme_demo import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "performance.md"  # the page holding this script's generated block
MODES = ("memory", "disk", "host")


def _pool(paths: dict[str, str], mode: str):
    from adamerge.backbones.heads import Identity
    from adamerge.backbones.hf_checkpoints import HFModelPool

    finetuned = {t: p for t, p in paths.items() if t != "pretrained"}
    return HFModelPool(backbone={"_target_": "adamerge.backbones.hf.causal_lm", "model": paths["pretrained"]},
                       finetuned=finetuned, heads={t: Identity() for t in finetuned}, pretrained=paths["pretrained"],
                       auto_class="AutoModelForCausalLM", streaming=False if mode == "memory" else mode)


def _work(paths: dict[str, str], kind: str, mode: str, method: str, steps: int, batch: int, length: int) -> dict:
    import torch

    from adamerge.methods import get_method
    from adamerge.methods.learned.adamerging import build_learned

    timings = {}
    start = time.perf_counter()
    pool = _pool(paths, mode)
    vectors = pool.task_vectors()
    timings["pool_seconds"] = time.perf_counter() - start
    per_task = sum(pool.backbone.state_dict()[n].numel() for n in vectors.names)
    info = {"task_vectors_mb": vectors.num_tasks * per_task * 4 / 2**20}
    if kind == "merge":
        start = time.perf_counter()
        deltas = get_method(method).fn(vectors)
        state = vectors.state_dict_from_deltas(deltas)
        timings["merge_seconds"] = time.perf_counter() - start
        del state, deltas
        return {**info, **timings, "resident_task_vectors_mb": vectors.memory_bytes() / 2**20}
    vocab = pool.backbone.config.vocab_size
    module = build_learned("adamerging_layer_wise", pool.shared_backbone(), vectors, pool.heads, layer_groups="block")
    module.set_task_batching("auto")  # streamed: merged module by module, once a step for all tasks; else sequential
    optimizer = module.configure_optimizers()
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, length), generator=generator),
              "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        module.accumulate_gradients({task: {"inputs": inputs} for task in pool.task_names},
                                    None if module.merges_per_module else module.merged.merged_weights())
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    timings["step_seconds"] = sum(seconds) / len(seconds)
    timings["first_step_seconds"] = seconds[0]
    return {**info, **timings, "merged_model": type(module.merged).__name__,
            "resident_task_vectors_mb": vectors.memory_bytes() / 2**20}


def measure(paths: dict[str, str], kind: str, mode: str, method: str, steps: int, batch: int, length: int) -> dict:
    """In this process: warm up on a minuscule pool, then the peak resident memory ``kind`` adds."""
    import torch
    import transformers

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as warm:
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(warm)
        _work({"pretrained": warm, **{t: warm for t in paths if t != "pretrained"}}, kind, mode, method, 1, 1, 4)
    reset_peak()
    baseline = _rss("VmRSS")
    result = _work(paths, kind, mode, method, steps, batch, length)
    return {**result, "peak_mb": (_rss("VmHWM") - baseline) / 2**20, "baseline_mb": baseline / 2**20}


def run_measurement(paths: dict, kind: str, mode: str, *, method: str = "task_arithmetic", steps: int = 3,
                    batch: int = 2, length: int = 32) -> dict:
    """:func:`measure` in a fresh process (its imports and allocator state do not count)."""
    spec = json.dumps({"paths": {k: str(v) for k, v in paths.items()}, "kind": kind, "mode": mode, "method": method,
                       "steps": steps, "batch": batch, "length": length})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    output = subprocess.run([sys.executable, __file__, "--measure", spec], check=True, capture_output=True, text=True,
                            env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def render(rows: list[dict], shape: dict, machine: str) -> str:
    lines = ["| work | mode | peak RSS (MB) | seconds | task vectors resident (MB) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "merge":
            seconds = f"{r['pool_seconds']:.1f} load + {r['merge_seconds']:.1f} merge"
        else:
            seconds = f"{r['pool_seconds']:.1f} load + {r['step_seconds']:.2f} / step"
        work = f"{r['method']} merge" if r["kind"] == "merge" else f"layer-wise AdaMerging, {shape['steps']} steps"
        lines.append(f"| {work} | {r['mode']} | {r['peak_mb']:.0f} | {seconds} | {r['resident_task_vectors_mb']:.0f} |")
    lines.append(
        f"\nPool: Llama-shaped, hidden {shape['hidden']}, intermediate {shape['intermediate']}, {shape['layers']} layers, "
        f"vocab {shape['vocab']}, K = {shape['tasks']} fine-tuned copies (θ0 + seeded noise), float32: "
        f"{shape['model_mb']:.0f} MB per checkpoint, {rows[0]['task_vectors_mb']:.0f} MB of task vectors. Learning steps: "
        f"batch {shape['batch']} × {shape['length']} tokens per task, entropy objective. Generated by "
        f"`nice -n 10 python bench/streaming.py` on {machine}, one torch thread per process, each row a fresh "
        "process (peak = VmHWM above the resident set after imports and a warm-up). The machine's 2 cores were shared "
        "with other jobs, so the seconds are indicative only; the peaks do not depend on that. Files were just written, "
        "so reads came from the page cache (a cold disk makes `disk` slower). What remains in the streamed rows: the "
        "pool's frozen model, the merged deltas and the merged state dict (1× the model each) for a merge, plus one "
        "tensor's K slices (the embedding's, here) being formed; for learning, the frozen model (the module shares the "
        "pool's) and the activations of the K tasks' batches, in one forward (`task_batching=auto`): the streamed "
        "rows merge module by module, a band of one weight at a time, so neither the merged weights nor their "
        "gradients are ever whole (in memory they are 1× each). `host` keeps the task vectors on the host, which on a "
        "CPU-only run is where learning happens: it saves the loading peak there (on a GPU it keeps them off the "
        "device).")
    return "\n".join(lines)


def publish(table: str) -> str:
    """The table into bench/results/streaming.md and its block of docs/performance.md."""
    from adamerge.reporting.results import replace_marked_block

    (RESULTS / "streaming.md").write_text(table + "\n")
    replace_marked_block(PAGE, "streaming", table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--render", action="store_true", help="rewrite streaming.md from streaming.json")
    args = parser.parse_args()
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(measure(spec["paths"], spec["kind"], spec["mode"], spec["method"], spec["steps"],
                                 spec["batch"], spec["length"])))
        return
    from adamerge.reporting.results import write_json

    if args.render:
        saved = json.loads((RESULTS / "streaming.json").read_text())
        publish(render(saved["rows"], saved["shape"], saved["machine"]))
        return
    machine = f"{os.cpu_count()} cores of an {cpu_name()} ({platform.machine()}), no GPU, Python {platform.python_version()}"
    shape = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab", "tasks", "steps", "batch", "length")}
    rows = []
    with tempfile.TemporaryDirectory() as root:
        paths = build_pool(Path(root), args.hidden, args.intermediate, args.layers, args.vocab, args.tasks)
        shape["model_mb"] = (Path(paths["pretrained"]) / "model.safetensors").stat().st_size / 2**20
        for method in args.methods.split(","):
            for mode in ("memory", "disk"):
                rows.append({"kind": "merge", "method": method, "mode": mode,
                             **run_measurement(paths, "merge", mode, method=method)})
                print(rows[-1], flush=True)
        for mode in MODES:
            rows.append({"kind": "learn", "method": "adamerging_layer_wise", "mode": mode,
                         **run_measurement(paths, "learn", mode, steps=args.steps, batch=args.batch, length=args.length)})
            print(rows[-1], flush=True)
    write_json(RESULTS / "streaming.json", {"machine": machine, "seed": 0, "shape": shape, "rows": rows})
    print(publish(render(rows, shape, machine)))


if __name__ == "__main__":
    main()
