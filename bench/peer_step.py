"""Peer benchmark: one AdaMerging *layer-wise* learning step, ours vs FusionBench's, side by side.

Every (model, implementation) runs in its own child process (``--impl``), built from the same seeds, so all
three see bit-identical backbones, fine-tuned models, heads and batches; the parent spawns them one after
another and reads one JSON line of results from each child's stdout.

Implementations
---------------
``plain``
    The cost floor of any AdaMerging step: the pretrained backbone with its weights as ``nn.Parameter`` s that
    require grad (no merge, no task vectors, no optimizer); per step the K task batches go one after another
    through the backbone, each task's frozen head gives logits, their mean prediction entropy is
    back-propagated into the weights' ``.grad`` (set to None at the start of the step).
``adamerge``
    ``adamerge.methods.learned.merged.MergedModel(granularity="layer_wise", init_value=0.3, clamp=None)`` on
    ``TaskVectors.from_state_dicts`` and ``AdaMergingModule(lr=1e-3, objective=Entropy())``, driven without a
    Lightning Trainer: ``zero_grad(set_to_none=True)``; ``accumulate_gradients(batch, merged_weights())``;
    ``optimizer.step()`` (merge once, per-task forward+backward into detached leaves, one backward through
    the merge).
``fusionbench``
    ``fusion_bench.models.wrappers.layer_wise_fusion.LayerWiseMergedModel`` (``clamp_weights=False``;
    ``tie_weights=True, strict=False`` as in FusionBench's ``method/adamerging/clip.yaml``) with
    ``get_layer_wise_weights(K, L, init_values=0.3)`` and the loop of
    ``fusion_bench/method/adamerging/layer_wise_adamerging.py::test_time_adaptation``: per task
    ``entropy_loss(head(module(images))).backward(retain_graph=True)``, then ``optimizer.step();
    optimizer.zero_grad(); module.merge_weights()`` with a plain ``torch.optim.Adam([merge_weight], lr=1e-3)``
    (no Fabric, no tqdm/metric logging). Differences from their loop, on purpose: the head is a frozen
    ``nn.Linear`` on the backbone's features (their CLIP variant scores projected, normalised image
    embeddings against zero-shot text embeddings), and the wrapped model stays in **eval** mode -- their loop
    calls ``module.train()``, which for a BatchNorm backbone (EfficientNet) would normalise with batch
    statistics and overwrite the running statistics; the CLIP tower has no BatchNorm and no active dropout,
    so there it changes nothing.

Models (``--models``)
---------------------
``clip``: ``transformers.CLIPVisionModel`` (hidden 256, 6 layers, 4 heads, MLP 1024, 224 px, patch 32), random
seeded weights, features = ``pooler_output`` (:class:`PooledCLIPVision`); K = 8 tasks × 16 images, 224 px.
``efficientnet``: ``adamerge.backbones.efficientnet.EfficientNetLite0(num_classes=None)`` (pooled 1280-d
features), eval mode; K = 8 × 16 images at 64 px. Its random init has BatchNorm running statistics (0, 1)
that let the features vanish (~1e-9), so the "pretrained" model's running statistics are first calibrated
on seeded noise images (a cumulative average over 4 train-mode batches, then eval).
Fine-tuned model k = pretrained + seeded Gaussian noise of std ``0.01 × RMS(tensor)`` (1e-3 for an all-zero
tensor) on every float *parameter*; buffers (BatchNorm statistics) stay pretrained. Heads: seeded
``nn.Linear(features, 10)``. Batches: seeded standard-normal images, a different one per step and task, all
generated before the timed loop.

Merged tensors: FusionBench merges every parameter with ``requires_grad`` (``named_parameters`` order, one
column of ``merge_weight [K, L]`` each); adamerge every float tensor of the task vectors except BatchNorm
running statistics (one row of ``coefficients [L, K]`` each). For both models the two sets coincide (the
parent checks it and compares coefficients by tensor name).

Measurements (each child: ``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``)
----------------------------------------------------------------------------
- seconds per step: median over ``--steps`` timed steps after ``--warmup`` untimed ones;
- peak memory: ``ru_maxrss`` after the run minus the RSS right after building models and batches (the
  high-water mark is reset to the current RSS at that point through ``/proc/self/clear_refs``, so the build's
  transient peak does not hide the step's), both the delta and the absolute value; on CUDA also
  ``torch.cuda.max_memory_allocated`` above the allocation after building;
- the learned coefficients after the run, as ``{tensor name: [K values]}``.
``--check``: per model, ``adamerge`` and ``fusionbench`` run ``--check-steps`` (5) steps in float64 (models,
task vectors, heads and batches cast to double; ``--check-batch`` 4 images per task) and the parent reports the
max |Δλ| between the two (expected below 1e-5). A default run does the check first, then the timing, and writes
``bench/results/peer_step.json`` and ``bench/results/peer_step.md``.

What the float64 check leaves, and why (measured with one-off monkeypatches, not part of this script):
``MergedModel`` creates its coefficients in float32, so cast to double they would start at float32(0.3) =
0.3 + 1.19e-8 (FusionBench: exactly 0.3) -- the check refills them with 0.3 in float64. The remaining ~2e-7
(CLIP) / ~5e-8 (EfficientNet) come almost entirely from adamerge's ``token_entropy`` computing in float32
(``logits.float()`` downcasts float64 logits); FusionBench's ``entropy_loss`` (``log(p + 1e-8)``) and
``TaskVectors.from_state_dicts`` subtracting in float32 contribute ~1e-9. With all of these made exact the two
agree to 3e-15: the same merge, objective, gradient and Adam update. In the float32 timing run the coefficients
can differ by up to ~2·lr after 23 steps where the true gradient is below float32 roundoff (the ViT
``k_proj.bias``: exactly zero, attention is invariant to a per-query constant; some EfficientNet BatchNorm /
depthwise tensors, |g| ~ 1e-7 against a median 2e-4): Adam's scale-free update turns roundoff into ±lr steps,
in either implementation.

    pip install -e ".[bench]"                 # fusion-bench==0.2.33
    python bench/peer_step.py                 # check + timing, both models (~7 min on 2 CPU cores)
    python bench/peer_step.py --check         # float64 agreement only
    python bench/peer_step.py --models clip --steps 5 --warmup 1 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "performance.md"  # the page holding this script's generated block
RESULTS = ROOT / "bench" / "results"
IMPLS = ("plain", "adamerge", "fusionbench")
MODELS = {  # tasks, images per task, image size
    "clip": {"tasks": 8, "batch": 16, "image": 224},
    "efficientnet": {"tasks": 8, "batch": 16, "image": 64},
}
NUM_CLASSES = 10
INIT_VALUE = 0.3
LR = 1e-3
NOISE = 0.01  # fine-tuned = pretrained + N(0, (NOISE * RMS)^2)
TOLERANCE = 1e-5
MiB = 2**20


# ----------------------------------------------------------------------------------------------------------
# child: build identical models / batches, run one implementation
# ----------------------------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def make_clip_wrapper():
    from torch import nn
    from transformers import CLIPVisionConfig, CLIPVisionModel

    class PooledCLIPVision(nn.Module):
        """``CLIPVisionModel`` returning ``pooler_output`` (the post-layernorm CLS token), the heads' features."""

        def __init__(self) -> None:
            super().__init__()
            config = CLIPVisionConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                                      intermediate_size=1024, image_size=224, patch_size=32)
            self.model = CLIPVisionModel(config)

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).pooler_output

    return PooledCLIPVision


def calibrate_batchnorm(net, image: int, seed: int, batches: int = 4, size: int = 32) -> None:
    """Set every BatchNorm's running statistics to the cumulative average over seeded noise batches."""
    torch = _torch()
    from torch.nn.modules.batchnorm import _BatchNorm

    norms = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    generator = torch.Generator().manual_seed(seed * 1000 + 900)
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            net(torch.randn(size, 3, image, image, generator=generator))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()


def build_backbone(model: str, seed: int):
    torch = _torch()
    torch.manual_seed(seed)
    if model == "clip":
        net = make_clip_wrapper()()
    else:
        from adamerge.backbones.efficientnet import EfficientNetLite0

        net = EfficientNetLite0(num_classes=None)
        calibrate_batchnorm(net, MODELS[model]["image"], seed)
    return net.eval()


def finetuned_states(backbone, tasks: int, seed: int) -> list[dict]:
    """Pretrained + seeded noise on every float parameter; buffers copied unchanged."""
    torch = _torch()
    parameters = {name for name, _ in backbone.named_parameters()}
    base = backbone.state_dict()
    states = []
    for k in range(tasks):
        generator = torch.Generator().manual_seed(seed * 1000 + 100 + k)
        state = {}
        for name, tensor in base.items():
            if name in parameters and tensor.is_floating_point():
                rms = tensor.double().pow(2).mean().sqrt().item()
                scale = NOISE * rms if rms > 0 else 1e-3
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                state[name] = tensor.detach() + scale * noise
            else:
                state[name] = tensor.detach().clone()
        states.append(state)
    return states


def build_heads(features: int, tasks: int, seed: int) -> list:
    torch = _torch()
    heads = []
    for k in range(tasks):
        torch.manual_seed(seed * 1000 + 500 + k)
        heads.append(torch.nn.Linear(features, NUM_CLASSES).requires_grad_(False))
    return heads


def build_batches(steps: int, tasks: int, batch: int, image: int, seed: int) -> list[list]:
    """``batches[step][task]``: seeded standard-normal images (generated in float32, cast later)."""
    torch = _torch()
    out = []
    for s in range(steps):
        row = []
        for k in range(tasks):
            generator = torch.Generator().manual_seed(seed * 1_000_000 + s * 1000 + k)
            row.append(torch.randn(batch, 3, image, image, generator=generator))
        out.append(row)
    return out


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Trim the allocator and reset the RSS high-water mark (what ru_maxrss reports) to the current RSS."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def entropy_plain(logits):
    torch = _torch()
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1).mean()


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    device = torch.device(args.device)
    check = args.check
    dtype = torch.float64 if check else torch.float32
    spec = dict(MODELS[args.model])
    if check:
        spec["batch"] = args.check_batch
    tasks, batch_size, image = spec["tasks"], spec["batch"], spec["image"]
    total_steps = args.check_steps if check else args.warmup + args.steps
    warmup = 0 if check else args.warmup
    task_names = [f"task{k}" for k in range(tasks)]

    # -- build (identical in every process) ----------------------------------------------------------------
    backbone = build_backbone(args.model, args.seed)
    features = 256 if args.model == "clip" else 1280
    finetuned = finetuned_states(backbone, tasks, args.seed) if args.impl != "plain" else []
    heads = build_heads(features, tasks, args.seed)
    batches = build_batches(total_steps, tasks, batch_size, image, args.seed)
    backbone.to(dtype)
    heads = [h.to(device=device, dtype=dtype) for h in heads]
    finetuned = [{n: t.to(dtype) if t.is_floating_point() else t for n, t in s.items()} for s in finetuned]
    batches = [[x.to(device=device, dtype=dtype) for x in row] for row in batches]
    info: dict[str, Any] = {}

    if args.impl == "plain":
        net = backbone.requires_grad_(True).to(device)
        params = list(net.parameters())

        def step(inputs: list) -> float:
            for p in params:
                p.grad = None
            total = 0.0
            for head, x in zip(heads, inputs):
                loss = entropy_plain(head(net(x)))
                loss.backward()
                total += loss.item()
            return total

        def coefficients() -> dict[str, list[float]]:
            return {}

    elif args.impl == "adamerge":
        from adamerge.methods.learned.merged import MergedModel
        from adamerge.training.module import AdaMergingModule
        from adamerge.objectives import Entropy
        from adamerge.pool.task_vectors import TaskVectors

        pretrained_state = backbone.state_dict()
        vectors = TaskVectors.from_state_dicts(
            pretrained_state, dict(zip(task_names, finetuned)), storage_dtype=dtype
        )
        # TaskVectors computes τ = ft.float() − pre.float(): float32 arithmetic even for float64 inputs.
        exact_error = max(
            (vectors.vectors[n][k].double() - (finetuned[k][n].double() - pretrained_state[n].double())).abs().max().item()
            for n in vectors.names for k in range(tasks)
        )
        info["task_vector_max_abs_error_vs_exact"] = exact_error
        del finetuned
        merged = MergedModel(backbone, vectors, granularity="layer_wise", init_value=INIT_VALUE, clamp=None)
        del vectors
        module = AdaMergingModule(merged, dict(zip(task_names, heads)), lr=LR, objective=Entropy())
        module.to(device=device, dtype=dtype)  # float64 check: coefficients (created float32) become double
        if check:
            # MergedModel creates its coefficients in float32: cast to double they start at float32(0.3) =
            # 0.3 + 1.19e-8 for every entry, FusionBench's get_layer_wise_weights(dtype=float64) at exactly 0.3.
            info["init_offset_before_refill"] = module.merged.coefficients.detach().sub(INIT_VALUE).abs().max().item()
            with torch.no_grad():
                module.merged.coefficients.fill_(INIT_VALUE)
        optimizer = module.configure_optimizers()
        info["coefficients_shape"] = list(module.merged.coefficients.shape)
        info["coefficients_dtype"] = str(module.merged.coefficients.dtype)
        names = list(module.merged.names)

        def step(inputs: list) -> float:
            batch = {task: {"inputs": x} for task, x in zip(task_names, inputs)}
            optimizer.zero_grad(set_to_none=True)
            objectives = module.accumulate_gradients(batch, module.merged_weights())
            optimizer.step()
            return sum(objectives.values())

        def coefficients() -> dict[str, list[float]]:
            values = module.merged.coefficients.detach().double().cpu()  # [L, K]: one row per merged tensor
            return {name: values[i].tolist() for i, name in enumerate(names)}

    else:
        from fusion_bench.method.adamerging.entropy_loss import entropy_loss
        from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

        names = [n for n, p in backbone.named_parameters() if p.requires_grad]
        models = []
        for state in finetuned:
            model = copy.deepcopy(backbone)  # a module of the backbone's class; weights loaded next
            model.load_state_dict(state)
            models.append(model)
        del finetuned
        module = LayerWiseMergedModel(
            layer_wise_weight=get_layer_wise_weights(tasks, len(names), init_values=INIT_VALUE, dtype=dtype),
            pretrained_model=backbone,
            finetuned_models=models,
            clamp_weights=False,
            tie_weights=True,
            strict=False,
        ).to(device)
        del models
        module.eval()  # their loop calls module.train(): see the module docstring
        optimizer = torch.optim.Adam([module.merge_weight], lr=LR)
        info["coefficients_shape"] = list(module.merge_weight.shape)
        info["coefficients_dtype"] = str(module.merge_weight.dtype)
        module.merge_weights()  # before their loop

        def step(inputs: list) -> float:
            losses = []
            for head, x in zip(heads, inputs):
                logits = head(module(x))
                loss = entropy_loss(logits)
                loss.backward(retain_graph=True)
                losses.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad()
            module.merge_weights()
            return losses

        def coefficients() -> dict[str, list[float]]:
            values = module.merge_weight.detach().double().cpu()  # [K, L]: one column per parameter
            return {name: values[:, j].tolist() for j, name in enumerate(names)}

    # -- measure -----------------------------------------------------------------------------------------
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        cuda_base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_build = rss_kib()
    peak_reset = reset_peak_rss()
    rss_after_trim = rss_kib()
    times, objectives = [], []
    for index in range(total_steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        value = step(batches[index])
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if index >= warmup:
            times.append(elapsed)
        objectives.append(value)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    objectives = [float(sum(float(v) for v in o)) if isinstance(o, list) else float(o) for o in objectives]
    result = {
        "impl": args.impl,
        "model": args.model,
        "mode": "check" if check else "timing",
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "tasks": tasks,
        "batch": batch_size,
        "image": image,
        "warmup": warmup,
        "steps": len(times),
        "step_seconds": times,
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "rss_after_build_mib": rss_build / 1024,
        "rss_baseline_mib": rss_after_trim / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_rss_delta_mib": (peak - rss_after_trim) / 1024,
        "peak_rss_reset": peak_reset,
        "cuda_peak_allocated_delta_mib": (torch.cuda.max_memory_allocated(device) - cuda_base) / MiB if cuda else None,
        "objective_per_step": objectives,
        "coefficients": coefficients(),
        **info,
    }
    return result


# ----------------------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------------------
def spawn(args: argparse.Namespace, model: str, impl: str, check: bool) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--impl", impl, "--model", model,
               "--device", args.device, "--seed", str(args.seed), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--check-steps", str(args.check_steps),
               "--check-batch", str(args.check_batch)]
    if check:
        command.append("--check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"child {model}/{impl}{' --check' if check else ''} failed with exit code {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    print(f"  {model:12s} {impl:11s} {'check ' if check else 'timing'} done in {result['process_seconds']:.0f}s"
          + (f": {result['median_s']:.3f} s/step" if not check else ""), flush=True)
    return result


def compare(ours: dict[str, list[float]], theirs: dict[str, list[float]]) -> dict[str, Any]:
    common = [n for n in ours if n in theirs]
    diffs = {n: max(abs(a - b) for a, b in zip(ours[n], theirs[n])) for n in common}
    worst = max(diffs, key=diffs.get) if diffs else None
    return {
        "merged_tensors": len(common),
        "only_adamerge": sorted(set(ours) - set(theirs)),
        "only_fusionbench": sorted(set(theirs) - set(ours)),
        "max_abs_diff": diffs[worst] if worst else None,
        "worst_tensor": worst,
        "max_abs_move": max((abs(v - INIT_VALUE) for vals in ours.values() for v in vals), default=None),
    }


def machine() -> dict[str, Any]:
    import torch

    model_name = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    return {
        "processor": platform.processor(),
        "cpu_model": model_name,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": 1,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def machine_line(m: dict[str, Any]) -> str:
    cpu = m["cpu_model"] or m["processor"] or platform.machine()
    return (f"Machine: {cpu}, {m['cpu_count']} CPUs, "
            f"torch {m['torch']}, {m['threads']} torch thread per process, Python {m['python']}, {m['date']}")


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(model: str, timing: dict[str, dict], check: dict | None, device: str) -> str:
    spec = MODELS[model]
    cuda = device.startswith("cuda")
    header = "| impl | s/step (median) | ratio to plain | peak RSS delta MiB | peak RSS MiB (abs) |"
    rule = "|---|---:|---:|---:|---:|"
    if cuda:
        header += " CUDA peak alloc MiB |"
        rule += "---:|"
    header += " max \\|Δλ\\| vs FusionBench (float64 check) |"
    rule += "---:|"
    lines = [f"### {model}: K = {spec['tasks']} tasks × {spec['batch']} images, {spec['image']} px", "", header, rule]
    plain = timing.get("plain", {}).get("median_s")
    for impl in IMPLS:
        if impl not in timing:
            continue
        r = timing[impl]
        ratio = r["median_s"] / plain if plain else None
        if impl == "plain":
            delta = "—"
        elif impl == "fusionbench":
            delta = "0 (reference)"
        else:
            delta = fmt(check["max_abs_diff"], ".2e") if check and check.get("max_abs_diff") is not None else "—"
        row = (f"| {impl} | {r['median_s']:.3f} | {fmt(ratio, '.2f')} | {r['peak_rss_delta_mib']:.0f} | "
               f"{r['peak_rss_mib']:.0f} |")
        if cuda:
            row += f" {fmt(r.get('cuda_peak_allocated_delta_mib'), '.0f')} |"
        lines.append(row + f" {delta} |")
    notes = []
    if check:
        notes.append(f"float64 check: {check['steps']} steps, {check['batch']} images per task, "
                     f"{check['merged_tensors']} merged tensors (same set in both: "
                     f"{not check['only_adamerge'] and not check['only_fusionbench']}), coefficients moved up to "
                     f"{fmt(check['max_abs_move'], '.2e')} from {INIT_VALUE}; "
                     f"agree to {TOLERANCE:g}: {check['agree']}.")
    if "adamerge" in timing and "fusionbench" in timing:
        f32 = compare(timing["adamerge"]["coefficients"], timing["fusionbench"]["coefficients"])
        notes.append(f"float32 timing run ({timing['adamerge']['warmup'] + timing['adamerge']['steps']} steps): "
                     f"max |Δλ| {fmt(f32['max_abs_diff'], '.2e')} (at {f32['worst_tensor']}); step-0 objective (sum over tasks) adamerge "
                     f"{timing['adamerge']['objective_per_step'][0]:.6f}, fusionbench "
                     f"{timing['fusionbench']['objective_per_step'][0]:.6f}.")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def run_checks(args: argparse.Namespace, models: list[str]) -> dict[str, dict]:
    checks = {}
    for model in models:
        ours = spawn(args, model, "adamerge", check=True)
        theirs = spawn(args, model, "fusionbench", check=True)
        c = compare(ours["coefficients"], theirs["coefficients"])
        c.update(steps=ours["steps"], batch=ours["batch"], dtype=ours["dtype"],
                 agree=c["max_abs_diff"] is not None and c["max_abs_diff"] <= TOLERANCE
                 and not c["only_adamerge"] and not c["only_fusionbench"],
                 objective_adamerge=ours["objective_per_step"], objective_fusionbench=theirs["objective_per_step"],
                 task_vector_max_abs_error_vs_exact=ours.get("task_vector_max_abs_error_vs_exact"),
                 coefficients_adamerge=ours["coefficients"], coefficients_fusionbench=theirs["coefficients"])
        checks[model] = c
        print(f"[check] {model}: max |Δλ| = {fmt(c['max_abs_diff'], '.3e')} over {c['merged_tensors']} tensors "
              f"(worst {c['worst_tensor']}), only adamerge {c['only_adamerge'] or 'none'}, only fusionbench "
              f"{c['only_fusionbench'] or 'none'}, agree to {TOLERANCE:g}: {c['agree']}", flush=True)
        print(f"        objective per step adamerge    {[round(v, 10) for v in c['objective_adamerge']]}")
        print(f"        objective per step fusionbench {[round(v, 10) for v in c['objective_fusionbench']]}")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--check", action="store_true", help="parent: only the float64 agreement check; "
                        "child: run the float64 check")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 check in a full run")
    parser.add_argument("--check-steps", type=int, default=5)
    parser.add_argument("--check-batch", type=int, default=4, help="images per task in the float64 check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/peer_step.*")
    parser.add_argument("--readme", action="store_true", help="also rewrite the peer-step block of docs/performance.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.child:
        real_stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):  # libraries' prints must not corrupt the JSON line
            result = run_child(args)
        real_stdout.write(json.dumps(result) + "\n")
        return

    start = time.perf_counter()
    m = machine()
    print(machine_line(m), flush=True)
    checks = {} if args.no_check else run_checks(args, args.models)
    if args.check:
        return
    timings: dict[str, dict[str, dict]] = {}
    for model in args.models:
        timings[model] = {impl: spawn(args, model, impl, check=False) for impl in args.impls}
    tables = [table(model, timings[model], checks.get(model), args.device) for model in args.models]
    elapsed = time.perf_counter() - start
    command = "python bench/peer_step.py" + "".join(f" {a}" for a in sys.argv[1:])
    text = "\n".join([
        "# Peer step: one layer-wise AdaMerging step, adamerge vs FusionBench",
        "",
        f"Generated by `{command}` in {elapsed / 60:.1f} min; fusion-bench {fusion_bench_version()}. "
        f"Each (model, impl) in its own process; median of {args.steps} timed steps after {args.warmup} warm-up "
        "steps; `plain` = forward + backward of the K task batches through the unmerged backbone (the floor); "
        "peak RSS delta = peak RSS of the run minus RSS after building models and batches. "
        "See the docstring of `bench/peer_step.py` for the exact definitions.",
        "",
        machine_line(m),
        "",
        *[t + "\n" for t in tables],
    ])
    print()
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "peer_step.md").write_text(text)
        payload = {"machine": m, "command": command, "seconds": elapsed, "fusion_bench": fusion_bench_version(),
                   "settings": {"steps": args.steps, "warmup": args.warmup, "check_steps": args.check_steps,
                                "check_batch": args.check_batch, "seed": args.seed, "device": args.device,
                                "init_value": INIT_VALUE, "lr": LR, "noise": NOISE, "models": MODELS},
                   "check": checks, "timing": timings}
        (RESULTS / "peer_step.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {RESULTS / 'peer_step.md'} and {RESULTS / 'peer_step.json'}")
    if args.readme:
        from adamerge.reporting.results import replace_marked_block

        replace_marked_block(PAGE, "peer-step", text.split("\n", 2)[2].strip())


def fusion_bench_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusion-bench")
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
