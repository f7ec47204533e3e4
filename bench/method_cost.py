"""Time and memory of every data-free merge (and of AdaRank's decomposition) on two model pools.

Each measurement runs in its own process, so the peak resident memory (CPU) or the peak allocated CUDA memory
of one method is not mixed with another's: the process loads the pool's task vectors, records the baseline,
merges, and reports seconds and the peak above the baseline.

Pools: ``demo`` (the embedded demo zoo: EfficientNet-Lite0, K = 4 real task vectors) and ``clip`` (a CLIP
ViT-B/32 vision tower's tensor shapes -- width 768, MLP 3072, 7.7 M parameters per block -- with random task
vectors, K = 8; ``--clip-blocks`` of its 12 blocks, so a CPU run stays short; costs of the per-block methods
scale with the number of blocks). Writes bench/results/method_cost.{json,md} (and the ``method-cost`` block of docs/performance.md where it has its markers).

    python bench/method_cost.py                          # demo + a 1-block CLIP-shaped pool, on this machine
    python bench/method_cost.py --pools clip --clip-blocks 12 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from readme_demo import cpu_name

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "performance.md"  # the page holding this script's generated block
RESULTS = ROOT / "bench" / "results"
STATIC = ["weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs", "pcb", "tsv_merge", "iso_c", "iso_cts",
          "wudi"]
LEARNED_BUILD = ["adarank"]  # its one-off decomposition of every task vector; the learning step is not timed here


def clip_shaped_task_vectors(blocks: int, num_tasks: int, seed: int = 0):
    """Random task vectors with a CLIP ViT-B/32 vision tower's tensor shapes (open_clip names)."""
    from adamerge.pool.task_vectors import TaskVectors

    shapes = {"conv1.weight": (768, 3, 32, 32), "class_embedding": (768,), "positional_embedding": (50, 768),
              "ln_pre.weight": (768,), "ln_pre.bias": (768,), "ln_post.weight": (768,), "ln_post.bias": (768,),
              "proj": (768, 512)}
    for i in range(blocks):
        prefix = f"transformer.resblocks.{i}."
        shapes.update({prefix + "ln_1.weight": (768,), prefix + "ln_1.bias": (768,),
                       prefix + "attn.in_proj_weight": (2304, 768), prefix + "attn.in_proj_bias": (2304,),
                       prefix + "attn.out_proj.weight": (768, 768), prefix + "attn.out_proj.bias": (768,),
                       prefix + "ln_2.weight": (768,), prefix + "ln_2.bias": (768,),
                       prefix + "mlp.c_fc.weight": (3072, 768), prefix + "mlp.c_fc.bias": (3072,),
                       prefix + "mlp.c_proj.weight": (768, 3072), prefix + "mlp.c_proj.bias": (768,)})
    generator = torch.Generator().manual_seed(seed)
    pretrained = {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    vectors = {name: 1e-3 * torch.randn((num_tasks, *shape), generator=generator) for name, shape in shapes.items()}
    return TaskVectors([f"task{k}" for k in range(num_tasks)], pretrained, vectors)


def module_holding(tensors: dict) -> torch.nn.Module:
    """A module whose parameters are ``tensors`` under their dotted names (nested sub-modules): enough backbone for
    AdaRank's build, which decomposes the task vectors of the module's merged tensors."""
    root = torch.nn.Module()
    for name, value in tensors.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    return root


def demo_pool():
    from hydra import compose, initialize_config_dir

    from adamerge.cli.main import register_resolvers
    from adamerge.methods.configs import CONF_DIR
    from adamerge.cli.runner import build_from_config

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=demo"])
    return build_from_config(cfg.modelpool, _recursive_=False)


def reset_peak(device: torch.device) -> float:
    """Start a new peak (CUDA allocator statistics; on Linux, the process's VmHWM via /proc/self/clear_refs) and
    return the memory in use now, the baseline the merge's peak is measured above."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure_one(pool: str, method: str, clip_blocks: int, device: str, wudi_steps: int) -> dict:
    """In this process: load the pool, then time one merge and its peak memory above the loaded pool."""
    from adamerge.methods.data_free import merge_task_vectors
    from adamerge.methods.learned.adamerging import build_learned

    torch.manual_seed(0)
    backbone = heads = None
    if pool == "demo":
        model_pool = demo_pool()
        task_vectors, backbone, heads = model_pool.task_vectors(), model_pool.fresh_backbone(), model_pool.heads
    else:
        from adamerge.backbones.heads import Identity

        task_vectors = clip_shaped_task_vectors(clip_blocks, 8)
        backbone = module_holding(task_vectors.pretrained)
        heads = {task: Identity() for task in task_vectors.task_names}
    target = torch.device(device)
    task_vectors = task_vectors.to(target)
    baseline = reset_peak(target)
    hparams = {"steps": wudi_steps} if method == "wudi" else {}
    start = time.perf_counter()
    if method in LEARNED_BUILD:
        build_learned(method, backbone, task_vectors, heads)
    else:
        merge_task_vectors(method, task_vectors, **hparams)
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    seconds = time.perf_counter() - start
    report = task_vectors.memory_report()
    return {"seconds": seconds, "peak_above_pool_mb": max(peak_mb(target) - baseline, 0.0),
            "task_vectors_mb": report["task_vectors_mb"], "parameters_per_task": report["parameters_per_task"]}



def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} cores of an {cpu_name()}, no GPU"


def render(results: dict, args: argparse.Namespace) -> str:
    pools = list(results)
    header = "| method | " + " | ".join(f"{p}: seconds | {p}: peak above the task vectors (MB)" for p in pools) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(pools)]
    for method in STATIC + LEARNED_BUILD:
        cells = []
        for pool in pools:
            row = results[pool].get(method, {})
            cells += (["n/a", "n/a"] if "seconds" not in row else
                      [f"{row['seconds']:.2f}", f"{row['peak_above_pool_mb']:.0f}"])
        lines.append(f"| {method}{' (decomposition)' if method in LEARNED_BUILD else ''} | " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{pool}: {next(iter(r.values()))['task_vectors_mb']:.0f} MB of task vectors "
                      f"({next(iter(r.values()))['parameters_per_task'] / 1e6:.1f} M parameters per task)"
                      for pool, r in results.items())
    return "\n".join(lines + ["", f"Generated by `python bench/method_cost.py` on {machine(args.device)}: one process "
                              f"per cell; {sizes}; the CLIP-shaped pool has {args.clip_blocks} of ViT-B/32's 12 "
                              f"blocks and K = 8; WUDI runs {args.wudi_steps} Adam steps per matrix."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default="demo,clip")
    parser.add_argument("--clip-blocks", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--wudi-steps", type=int, default=300)
    parser.add_argument("--one", nargs=2, metavar=("POOL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.clip_blocks, args.device, args.wudi_steps)))
        return
    results: dict[str, dict] = {}
    for pool in args.pools.split(","):
        results[pool] = {}
        for method in STATIC + LEARNED_BUILD:
            command = [sys.executable, __file__, "--one", pool, method, "--clip-blocks", str(args.clip_blocks),
                       "--device", args.device, "--wudi-steps", str(args.wudi_steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[pool][method] = json.loads(output.strip().splitlines()[-1])
            print(pool, method, results[pool][method], flush=True)
    from adamerge.reporting.results import replace_marked_block, write_json

    block = render(results, args)
    write_json(RESULTS / "method_cost.json", {"device": args.device, "clip_blocks": args.clip_blocks,
                                              "wudi_steps": args.wudi_steps, "results": results})
    (RESULTS / "method_cost.md").write_text(block + "\n")
    print(block)
    if not args.no_readme and "<!-- method-cost:start -->" in PAGE.read_text():
        replace_marked_block(PAGE, "method-cost", block)


if __name__ == "__main__":
    main()
