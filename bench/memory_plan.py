"""The memory plan of learning merge coefficients over Llama-2-7B, 13B and 70B-shaped pools, before any download.

Shapes come from each model's config.json values (below), built on the meta device (no weights, no network).
Pools: K = 4 and K = 8 full fine-tunes (task vectors stored in bf16) and LoRA pools (rank 16 on every projection,
adapters in bf16, deltas formed one tensor at a time). The model runs in bf16 with bf16 activations, batch 4 ×
512 tokens per task, tasks one after the other (``task_batching=sequential``). For 1 and 8 × 80 GB GPUs:

* ``end to end``: what adamerge's trainer runs -- the whole merged model and its task vectors on each GPU (with
  8 GPUs, DDP replicates it; ``split`` spreads the blocks over the 8, a layout the trainer does not run yet);
* ``progressive``: one block at a time (its θ0, task vectors, merged weights, gradients and activations, plus the
  block's input and output hidden states), the working set of a block-by-block learner.

Writes bench/results/memory_plan.{json,md} (and the ``memory-plan`` block of docs/performance.md).

    python bench/memory_plan.py
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "performance.md"  # the page holding this script's generated block
RESULTS = ROOT / "bench" / "results"
GPU_BYTES = 80 * 10**9
HOST_NOTE = "host: the peak of loading (θ0, the K checkpoints being read, the task vectors) or of holding θ0 and them"
# config.json values of meta-llama/Llama-2-{7b,13b,70b}-hf.
LLAMA2 = {
    "Llama-2-7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32},
    "Llama-2-13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "Llama-2-70B": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 16
BATCH, SEQUENCE = 4, 512


def llama_config(sizes: dict) -> dict:
    return {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, **sizes}


def lora_parameters(inventory: dict, rank: int) -> int:
    """Elements of one rank-``rank`` adapter on every projection: r·(in + out) per targeted weight."""
    return sum(rank * (spec.shape[0] + spec.shape[1]) for name, spec in inventory.items()
               if name.endswith(".weight") and name.split(".")[-2] in LORA_TARGETS)


def plans_for(name: str, sizes: dict) -> list[dict]:
    from adamerge.pool.inventory import meta_inventory
    from adamerge.pool.memory_plan import plan_memory
    from adamerge.pool.memory_shapes import RunShape, model_shape

    config = llama_config(sizes)
    inventory = meta_inventory(config, "AutoModelForCausalLM", dtype="bfloat16")
    full = model_shape(inventory, config=config)
    targeted = [n for n in inventory if n.endswith(".weight") and n.split(".")[-2] in LORA_TARGETS]
    lora = model_shape(inventory, merged=targeted, config=config)
    rows = []
    for pool, model, adapter in (("full", full, 0), ("LoRA r16", lora, lora_parameters(inventory, LORA_RANK))):
        for tasks in (4, 8):
            run = RunShape(num_tasks=tasks, storage_bytes=2, activation_bytes=2, batch_size=BATCH,
                           sequence_length=SEQUENCE, checkpoint_bytes=2 * adapter if adapter else full.model_bytes,
                           coefficient_rows=sizes["num_hidden_layers"] + 3, adapter_parameters=adapter)
            # Streamed from disk (modelpool.streaming=disk; adapters are never streamed: they are small).
            streamed = dataclasses.replace(run, streaming=None if adapter else "disk")
            checkpointed = dataclasses.replace(streamed, activation_checkpointing=True)
            cells = {
                "1 GPU, end to end": plan_memory(model, run, on_device=True),
                "1 GPU, end to end, streamed": plan_memory(model, streamed, on_device=True),
                "1 GPU, end to end, streamed, activation checkpointing": plan_memory(model, checkpointed,
                                                                                     on_device=True),
                "8 GPUs (DDP), end to end": plan_memory(model, run, on_device=True, devices=8),
                "8 GPUs (FSDP, trainer=fsdp), end to end, merged whole": plan_memory(
                    model, run, on_device=True, devices=8, sharded=True, sharded_per_module=False),
                "8 GPUs (FSDP, trainer=fsdp), end to end": plan_memory(model, run, on_device=True, devices=8,
                                                                       sharded=True),
                "8 GPUs (FSDP), end to end, streamed": plan_memory(model, streamed, on_device=True, devices=8,
                                                                   sharded=True),
                "1 GPU, progressive, streamed": plan_memory(model, streamed, on_device=True, working_set="progressive"),
                "1 GPU, progressive element-wise, streamed": plan_memory(
                    model, dataclasses.replace(streamed, element_coefficients=True), on_device=True,
                    working_set="progressive"),
            }
            rows.append({"model": name, "pool": pool, "tasks": tasks, "parameters": full.parameters,
                         "adapter_parameters_per_task": adapter,
                         "plans": {cell: plan.to_json() for cell, plan in cells.items()}})
    return rows


def render(rows: list[dict]) -> str:
    cells = list(rows[0]["plans"])
    lines = ["| model | pool | K | " + " | ".join(f"{c}: per GPU / host (GB)" for c in cells) + " |",
             "|---|---|---:|" + "---:|" * len(cells)]
    for row in rows:
        per_gpu = [f"{p['device_peak'] / 1e9:.0f}{'' if p['device_peak'] <= GPU_BYTES else ' ✗'} / "
                   f"{p['host_peak'] / 1e9:.0f}" for p in row["plans"].values()]
        lines.append(f"| {row['model']} | {row['pool']} | {row['tasks']} | " + " | ".join(per_gpu) + " |")
    lines.append(
        f"\nGenerated by `python bench/memory_plan.py` from the Llama-2 configs built on the meta device: bf16 model, "
        f"task vectors and activations, batch {BATCH} × {SEQUENCE} tokens per task (tasks in turn), LoRA rank "
        f"{LORA_RANK} on {', '.join(LORA_TARGETS)}; ✗ = more than 80 GB. {HOST_NOTE}. Columns: layer-wise AdaMerging with the "
        "task vectors in memory; the same streamed from the checkpoints (`modelpool.streaming=disk`, merged module by "
        "module; LoRA pools keep their adapters in memory and merge module by module already); over 8 GPUs replicated "
        "(`trainer=ddp`) or sharded (`trainer=fsdp`: each module gathers its layer and merges it when it runs, the "
        "default, or the merged weights formed whole on every rank, `trainer.strategy.merge_per_module=false`; "
        "streamed: each layer read from the checkpoints and sharded before the next, so no rank's host holds a task "
        "vector; host = the node's 8 processes together); activation checkpointing keeps each decoder layer's input "
        "only; progressive distillation, streamed, with one coefficient per task and tensor or the authors' one per "
        "task and element (one block's, with their gradient and Adam's moments). Progressive distillation runs on one "
        "GPU: its working set is one block, which one 80 GB GPU holds at every size here with tensor coefficients (the "
        "element-wise ones of a 70B block are too many for K = 8), so the 8-GPU columns are "
        "end-to-end learning (over a LoRA pool it merges each block from the adapters' factors). Host: the "
        "process's peak on the host (loading included; a streamed pool's task vectors stay on disk).")
    return "\n".join(lines)


def main() -> None:
    from adamerge.reporting.results import replace_marked_block, write_json

    rows = [row for name, sizes in LLAMA2.items() for row in plans_for(name, sizes)]
    block = render(rows)
    write_json(RESULTS / "memory_plan.json", {"batch": BATCH, "sequence": SEQUENCE, "gpu_bytes": GPU_BYTES,
                                              "rows": rows})
    (RESULTS / "memory_plan.md").write_text(block + "\n")
    print(block)
    if "<!-- memory-plan:start -->" in PAGE.read_text():
        replace_marked_block(PAGE, "memory-plan", block)


if __name__ == "__main__":
    main()
