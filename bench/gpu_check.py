"""The parts of bench/gpu_check.sh: build random pools of real shapes, learn on them, record time and memory.

Each part is one command (``python bench/gpu_check.py PART --work DIR --preset gpu|smoke``) that writes
``DIR/parts/PART.json``; gpu_check.sh runs them one after another under hard timeouts, so a part that fails or runs
out of time leaves the others' figures, and ``summary`` gathers whatever is there into ``gpu_check.json`` and
``gpu_check.md`` (bench/gpu_check_report.py turns that JSON into the docs' blocks).

Parts
-----
``env``               the GPU (name, memory, driver), torch / transformers / lightning / fusion-bench versions.
``clip-build``        a CLIP ViT-B/32-shaped ``CLIPModel`` (the real openai/clip-vit-base-patch32 shape, seeded random
                      weights, a word-level tokenizer over the shipped class names and templates, the CLIP image
                      processor), 8 fine-tuned vision towers (pretrained + seeded random low-rank updates,
                      ``bench/llm_pool.py``'s ``low_rank_update_``) named after the 8 CLIP tasks, and 8 ``datasets``
                      test splits of random images with random labels (``save_to_disk``).
``clip-adamerge``     ``adamerge experiment=clip_vit_b32_8tasks`` on that pool (layer-wise AdaMerging, entropy,
                      16 images per task per step, Adam lr 1e-3) for the preset's steps: the command itself in a
                      child process, its results.json (seconds, step profile, peak CUDA memory) and the child's
                      peak RSS (``os.wait4``).
``clip-fusionbench``  FusionBench 0.2.33's ``CLIPLayerWiseAdaMergingAlgorithm.run`` on the same checkpoints, data
                      and processor (its own ``CLIPVisionModelPool``, zero-shot heads, data loaders, Fabric and
                      loop), the same steps, batch, lr and λ init; its profiler's test-time-adaptation time per step
                      and ``torch.cuda.max_memory_allocated``.
``llm-build``         a causal-LM pool of ``bench/llm_pool.py`` (Qwen2.5-1.5B shape, bf16, K = 4 low-rank
                      fine-tunes, generated prompts).
``llm-adamerge``      ``adamerge experiment=causal_lm_qwen25_1p5b`` (end-to-end layer-wise AdaMerging, bf16 autocast,
                      task vectors in memory) for a few steps.
``llm-streamed``      the same with ``modelpool.streaming=disk`` (task vectors read per tensor, never held).
``llm-progressive``   ``method=progressive_distillation`` (block by block) on the same pool.
``summary``           gathers the parts (and the status gpu_check.sh recorded for each) into ``--out``.

A learning part stopped at its time limit (SIGTERM from gpu_check.sh) keeps the figures of the steps it did: an
adamerge run stops at the step boundary and saves its checkpoint, whose step profile is read back; FusionBench's loop
keeps its step timestamps. Such a result says ``partial``.

The weights and images are random: the figures are costs (seconds per step, memory), never accuracy.
Long because: the eight parts of one device call live in the one file that gpu_check.sh runs part by part.
``--preset smoke`` runs every part with tiny shapes and a few steps on the CPU (the test of the script here).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import importlib
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This checkout's adamerge (the GPU image has none installed) and the sibling llm_pool.py.
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from llm_pool import build_causal_lm_pool, cli_overrides, low_rank_update_, word_tokenizer  # noqa: E402

MiB = 2**20
STOP_GRACE_SECONDS = 7  # for a stopped adamerge run to save its checkpoint (gpu_check.sh kills the part 10 s after)
FIT_PROFILE = "lightning_profile"  # the SimpleProfiler's report of fit: <run dir>/fit-lightning_profile.txt
# CLIP ViT-B/32 (openai/clip-vit-base-patch32's config.json); the smoke preset keeps its structure at toy sizes.
CLIP_SHAPES: dict[str, dict[str, Any]] = {
    "gpu": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32),
            "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77, vocab_size=49408),
            "projection_dim": 512, "raw_image": 256},
    "smoke": {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=16),
              "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=77, vocab_size=8192),
              "projection_dim": 16, "raw_image": 40},
}
# Per preset: the CLIP run (images per task, steps, batch, data workers) and the causal-LM runs.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"clip": dict(images=128, steps=1000, batch=16, eval_batch=128, workers=4, rank=16),
            "llm": dict(shape="qwen2.5-1.5b", tasks=4, rank=16, prompts=64, words=48, steps=10, batch=4,
                        eval_samples=8, workers=2, steps_per_block=2, samples_per_task=16, distill_batch=4)},
    "smoke": {"clip": dict(images=12, steps=3, batch=4, eval_batch=16, workers=0, rank=2),
              "llm": dict(shape="tiny", tasks=4, rank=2, prompts=12, words=12, steps=2, batch=2,
                          eval_samples=4, workers=0, steps_per_block=1, samples_per_task=4, distill_batch=2)},
}
CLIP_TASKS = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
FUSION_BENCH_TASK = {"stanford_cars": "stanford-cars"}  # FusionBench's name of the task (its class names table)
LLM_PARTS = {  # part -> (method, streaming)
    "llm-adamerge": ("adamerging_layer_wise", "false"),
    "llm-streamed": ("adamerging_layer_wise", "disk"),
    "llm-progressive": ("progressive_distillation", "false"),
}
PARTS = ("env", "clip-build", "clip-adamerge", "clip-fusionbench", "llm-build", *LLM_PARTS)


# --------------------------------------------------------------------------------------------------------------------
# shared
# --------------------------------------------------------------------------------------------------------------------
def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def offline_environment(work: Path) -> dict[str, str]:
    """No hub, no wandb, the head cache inside the work folder: the GPU machine has no network."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "disabled", "ADAMERGE_CACHE_DIR": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the part that writes it first")
    return json.loads(path.read_text())


def run_adamerge(overrides: list[str], run_dir: Path, work: Path, log_name: str) -> dict[str, Any]:
    """``python -m adamerge.cli.main OVERRIDES`` in a child process: its results.json rows, its wall time and the
    child's own peak resident memory (``os.wait4``'s rusage: that process alone, not this one)."""
    # Lightning's SimpleProfiler (a trainer option any run may set) times the training loop by wall clock, the
    # measure FusionBench's loop is timed by here; adamerge's own step profile (CUDA events) stays in results.json.
    command = [sys.executable, "-m", "adamerge.cli.main", *overrides, f"hydra.run.dir={run_dir}",
               "trainer.enable_progress_bar=false", "logger=none", "export.enabled=false",
               "checkpoint.every_n_steps=0", "+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler",
               f"+trainer.profiler.dirpath={run_dir}", f"+trainer.profiler.filename={FIT_PROFILE}"]
    log_path = work / "logs" / f"{log_name}.child.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=offline_environment(work), stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_parent)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except PartTimedOut:
            # adamerge stops at the end of the step under way and saves its checkpoint (step profile included)
            child.send_signal(signal.SIGTERM)
            status, usage = _wait_at_most(child.pid, STOP_GRACE_SECONDS)
            if status is None:
                child.kill()
                os.wait4(child.pid, 0)
            return partial_adamerge(run_dir, time.perf_counter() - start, usage, log_path, overrides)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"adamerge exited with {code} after {seconds:.0f} s; the end of {log_path}:\n{tail}")
    rows = [json.loads(p.read_text()) for p in sorted(run_dir.rglob("results.json"))]
    if not rows:
        raise RuntimeError(f"adamerge finished but wrote no results.json under {run_dir}")
    loop = lightning_profile(run_dir / f"fit-{FIT_PROFILE}.txt").get("run_training_epoch")
    return {"command": " ".join(["adamerge", *overrides]), "process_seconds": seconds,
            "peak_rss_mib": usage.ru_maxrss / 1024, "loop_seconds": loop["total"] if loop else None,
            "memory_plan": planned_peaks(log_path.read_text()), "rows": rows}


def planned_peaks(log: str) -> dict[str, str]:
    """The peaks the memory plan printed before loading (``  host peak 12.3 GiB: ...``, ``  device peak ...``)."""
    return {match[1]: match[2] for match in re.finditer(r"^  (host|device) peak ([\d.]+ [MG]iB)", log, re.MULTILINE)}


class PartTimedOut(Exception):
    """gpu_check.sh's timeout sent SIGTERM: keep the figures of the steps done so far."""


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise PartTimedOut(f"stopped by signal {signum} at the part's time limit")


def _die_with_parent() -> None:
    """In the adamerge child: SIGKILL when this part's process dies (prctl PR_SET_PDEATHSIG), so a part killed at
    its limit never leaves a run holding the GPU while the next part starts."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _wait_at_most(pid: int, seconds: float) -> tuple[int | None, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        time.sleep(0.2)
    return None, None


def partial_adamerge(run_dir: Path, seconds: float, usage: Any, log_path: Path, overrides: list[str]) -> dict[str, Any]:
    """The figures of a run stopped at the time limit: its checkpoint's step profile and objective history."""
    import torch

    saved = sorted(run_dir.rglob("last.ckpt"))
    if not saved:
        raise RuntimeError(f"adamerge was stopped at the time limit after {seconds:.0f} s before it saved a checkpoint; "
                           f"the end of {log_path}:\n{log_path.read_text()[-2000:]}")
    state = torch.load(saved[0], map_location="cpu", weights_only=True)["adamerge"]  # as resume=true loads it
    profile, history = state["profile"], state["history"]
    # The checkpoint is written in the step-end hook before the module closes that step's profile: the profile covers
    # the steps before the last (on a GPU exactly; on the CPU its last step's phases are already in the seconds).
    profiled = int(profile["steps"])
    step_seconds = sum(value for phase, value in profile.items() if phase != "steps") / profiled if profiled else None
    steps = len(history)
    return {"command": " ".join(["adamerge", *overrides]), "process_seconds": seconds,
            "peak_rss_mib": usage.ru_maxrss / 1024 if usage is not None else None,
            "memory_plan": planned_peaks(log_path.read_text()), "method": None, "steps": steps,
            # no fit loop report for a stopped run: the step profile (CUDA events) of the steps done stands in
            "seconds_per_step": step_seconds, "profile_seconds_per_step": step_seconds,
            "objective_first": history[0]["objective"] if history else None,
            "objective_last": history[-1]["objective"] if history else None,
            "peak_memory_mib": None, "partial": f"{steps} steps done before the time limit (from its checkpoint)"}


def lightning_profile(path: Path) -> dict[str, dict[str, float]]:
    """The rows of a SimpleProfiler report: ``{action: {mean, calls, total}}`` (seconds); {} if there is none."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[0] not in ("Action", "Total"):
                with contextlib.suppress(ValueError):
                    rows[cells[0]] = {"mean": float(cells[1]), "calls": int(cells[2]), "total": float(cells[3])}
    return rows


def adamerge_figures(run: dict[str, Any]) -> dict[str, Any]:
    """A finished run's figures (its results.json row), or a stopped run's as they are."""
    if "rows" not in run:
        return run
    return {**{k: v for k, v in run.items() if k != "rows"}, **learned_row_figures(run["rows"][0], run["loop_seconds"])}


def learned_row_figures(row: dict[str, Any], loop_seconds: float | None) -> dict[str, Any]:
    """What a results.json row says about cost: steps, seconds per step (the training loop's wall time over its steps;
    the step profile's sum of phases), run seconds, peak CUDA memory (results.json's peak_memory_mb is the process's
    peak RSS on a CPU run: that is peak_rss_mib here)."""
    profile = row.get("profile") or {}
    steps = len(row.get("objective_history") or [])
    step_ms = sum(phase["ms_per_step"] for phase in profile.values()) if profile else None
    return {"method": row["method"], "steps": steps,
            "seconds_per_step": loop_seconds / steps if loop_seconds and steps else None,
            "profile_seconds_per_step": step_ms / 1000 if step_ms else None,
            "profile_ms_per_step": {name: phase["ms_per_step"] for name, phase in profile.items()},
            "method_seconds": row.get("seconds"),
            "peak_memory_mib": row.get("peak_memory_mb") if device_name() == "cuda" else None,
            "objective_first": (row.get("objective_history") or [None])[0],
            "objective_last": (row.get("objective_history") or [None])[-1]}


# --------------------------------------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------------------------------------
def part_env(work: Path, preset: str) -> dict[str, Any]:
    import torch
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        with contextlib.suppress(PackageNotFoundError):
            return version(name)
        return None

    info: dict[str, Any] = {"preset": preset, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "versions": {name: installed(name) for name in (
                                "torch", "transformers", "lightning", "datasets", "hydra-core", "omegaconf",
                                "fusion-bench", "safetensors", "peft", "huggingface-hub", "pyarrow", "fsspec",
                                "numpy", "tokenizers")}}
    # The carried wheels were installed without their dependencies: say here which of them import, and why not.
    info["adamerge"] = str(Path(importlib.import_module("adamerge").__file__).parent)
    info["imports"] = {}
    for module in ("hydra", "datasets", "adamerge.cli.runner", "fusion_bench.method.adamerging"):
        try:
            importlib.import_module(module)
            info["imports"][module] = "ok"
        except Exception as error:  # reported, not raised: the parts that need the module fail on their own
            info["imports"][module] = f"{type(error).__name__}: {error}"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": properties.name, "memory_gib": properties.total_memory / 2**30,
                       "multiprocessors": properties.multi_processor_count,
                       "capability": f"{properties.major}.{properties.minor}", "cuda": torch.version.cuda}
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            info["gpu"]["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip()
    else:
        info["gpu"] = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    return info


def clip_words() -> list[str]:
    """Every word of the shipped CLIP class names and templates, split as the tokenizer splits them."""
    from tokenizers import pre_tokenizers

    from adamerge.backbones.clip import clip_task

    split = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    words: set[str] = set()
    for task in CLIP_TASKS:
        classnames, templates = clip_task(task)
        for text in [*classnames, *templates]:
            words.update(piece for piece, _ in split.pre_tokenize_str(text.replace("{}", " ")))
    return sorted(words)


def part_clip_build(work: Path, preset: str) -> dict[str, Any]:
    import datasets
    import numpy as np
    import torch
    import transformers

    from adamerge.backbones.clip import clip_task

    shape, settings = CLIP_SHAPES[preset], PRESETS[preset]["clip"]
    root = work / "clip"
    start = time.perf_counter()
    pretrained = root / "pretrained"
    tokenizer = word_tokenizer(pretrained, clip_words())
    text = {**shape["text"], "vocab_size": max(shape["text"]["vocab_size"], len(tokenizer)),
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}
    config = transformers.CLIPConfig(text_config=text, vision_config=shape["vision"],
                                     projection_dim=shape["projection_dim"])
    torch.manual_seed(0)
    device = device_name()
    with torch.device(device):
        clip = transformers.CLIPModel(config).eval()
    clip.save_pretrained(pretrained)
    size = shape["vision"]["image_size"]
    transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                    crop_size={"height": size, "width": size}).save_pretrained(pretrained)
    del clip
    # The vision tower as the public fine-tunes ship it (tanganke/clip-vit-base-patch32_<task>: CLIPVisionModel).
    vision = transformers.CLIPVisionModel.from_pretrained(pretrained).to(device).eval()
    rng = np.random.default_rng(0)
    raw = shape["raw_image"]
    for k, task in enumerate(CLIP_TASKS):
        tuned = copy.deepcopy(vision)
        low_rank_update_(tuned, settings["rank"], scale=0.02, seed=1000 + k)
        tuned.save_pretrained(root / task)  # like tanganke/clip-vit-base-patch32_<task>
        del tuned
        classes = len(clip_task(task)[0])
        images = rng.integers(0, 256, (settings["images"], raw, raw, 3), dtype=np.uint8)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)})
        split = datasets.Dataset.from_dict({"image": list(images),
                                            "label": rng.integers(0, classes, settings["images"]).tolist()},
                                           features=features)
        datasets.DatasetDict({"test": split}).save_to_disk(root / "data" / task)
    return {"shape": shape, "tasks": list(CLIP_TASKS), "images_per_task": settings["images"],
            "vision_parameters": sum(p.numel() for p in vision.parameters()), "rank": settings["rank"],
            "tokenizer_words": len(tokenizer), "built_on": device, "build_seconds": time.perf_counter() - start,
            "bytes_on_disk": sum(f.stat().st_size for f in root.rglob("*") if f.is_file())}


def clip_overrides(root: Path, preset: str, cuda: bool) -> list[str]:
    """``experiment=clip_vit_b32_8tasks`` pointed at the pool clip-build wrote under ``root`` (its heads stay the
    experiment's zero-shot heads, made from the pool's CLIPModel)."""
    settings = PRESETS[preset]["clip"]
    return ["experiment=clip_vit_b32_8tasks", f"trainer={'gpu' if cuda else 'cpu'}",
            f"trainer.max_steps={settings['steps']}", f"modelpool.pretrained={root / 'pretrained'}",
            f"data.batch_size={settings['batch']}", f"data.eval_batch_size={settings['eval_batch']}",
            f"data.num_workers={settings['workers']}",
            *[f"modelpool.finetuned.{task}={root / task}" for task in CLIP_TASKS],
            *[f"data.tasks.{task}.path={root / 'data' / task}" for task in CLIP_TASKS]]


def part_clip_adamerge(work: Path, preset: str) -> dict[str, Any]:
    settings = PRESETS[preset]["clip"]
    root = work / "clip"
    read_json(work / "parts" / "clip-build.json")
    overrides = clip_overrides(root, preset, cuda=device_name() == "cuda")
    run = run_adamerge(overrides, root / "run_adamerge", work, "clip-adamerge")
    return {**adamerge_figures(run),
            "batch_per_task": settings["batch"], "tasks": len(CLIP_TASKS), "data_workers": settings["workers"]}


def part_clip_fusionbench(work: Path, preset: str) -> dict[str, Any]:
    import torch
    from importlib.metadata import version

    from omegaconf import DictConfig

    from fusion_bench.method.adamerging.clip_layer_wise_adamerging import CLIPLayerWiseAdaMergingAlgorithm
    from fusion_bench.modelpool import CLIPVisionModelPool
    from fusion_bench.utils.cache_utils import set_default_cache_dir

    settings = PRESETS[preset]["clip"]
    root = work / "clip"
    read_json(work / "parts" / "clip-build.json")
    names = {task: FUSION_BENCH_TASK.get(task, task) for task in CLIP_TASKS}
    pool = CLIPVisionModelPool(
        models=DictConfig({"_pretrained_": str(root / "pretrained"),
                           **{names[task]: str(root / task) for task in CLIP_TASKS}}),
        test_datasets=DictConfig({names[task]: {"_target_": "datasets.load_from_disk",
                                                "dataset_path": str(root / "data" / task / "test")}
                                  for task in CLIP_TASKS}),
        processor=str(root / "pretrained"))
    cwd = work / "fusionbench_run"
    cwd.mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)
    # Its joblib cache of zero-shot heads (keyed by task and model path, not by weights) defaults to the import-time
    # ./outputs/cache: inside this run's folder instead, so heads of an earlier pool at the same path never return.
    set_default_cache_dir(cwd / "heads_cache")
    # FusionBench's method/adamerging/clip.yaml with the run's steps, batch and workers (adamerge's data.num_workers),
    # and its fabric/auto.yaml (one device, TensorBoard logger: its loop logs loss and weights every step).
    fabric = {"_target_": "lightning.Fabric", "devices": 1, "strategy": "auto", "accelerator": "auto",
              "precision": None, "loggers": {"_target_": "lightning.fabric.loggers.TensorBoardLogger",
                                             "root_dir": str(cwd / "logs"), "name": "", "version": "",
                                             "sub_dir": None, "default_hp_metric": False}}
    config = DictConfig({"fabric": fabric, "name": "clip_layer_wise_adamerging", "weights": None, "optimizer": "adam", "lr": 1e-3,
                         "init_values": 0.3, "clamp_weights": False, "tie_weights": True, "strict": False,
                         "devices": 1, "batch_size": settings["batch"], "num_workers": settings["workers"],
                         "max_steps": settings["steps"], "fast_dev_run": False, "save_merging_weights": False,
                         "cache_dir": str(work / "fusionbench_cache")})
    algorithm = timed_fusion_bench_algorithm(CLIPLayerWiseAdaMergingAlgorithm)(config)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    partial = None
    try:
        algorithm.run(pool)
    except PartTimedOut:
        if not getattr(algorithm, "step_ends", None):
            raise
        partial = f"{len(algorithm.step_ends)} of {settings['steps']} steps done before the time limit"
    seconds = time.perf_counter() - start
    ends = algorithm.step_ends
    steps = len(ends)
    if partial is None and steps != settings["steps"]:
        raise RuntimeError(f"FusionBench's loop logged {steps} steps, expected {settings['steps']}")
    durations = [b - a for a, b in zip([algorithm.loop_start, *ends], ends)]
    profile = algorithm.profiler.recorded_durations
    phases = {name: sum(values) / steps for name, values in profile.items()
              if name in ("data loading", "forward pass", "backward pass", "optimizer step", "merging weights")}
    return {"fusion_bench": version("fusion-bench"), "steps": steps,
            "seconds_per_step": (ends[-1] - algorithm.loop_start) / steps,
            # steps 2..N: the first one also starts the 8 tasks' data-loader workers and wraps the model in Fabric
            "steady_seconds_per_step": (ends[-1] - ends[0]) / (steps - 1) if steps > 1 else None,
            "median_step_seconds": statistics.median(durations), "first_step_seconds": durations[0],
            "loop_seconds": ends[-1] - algorithm.loop_start, "heads_seconds": algorithm.heads_seconds,
            "run_seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "construct_seconds": sum(profile.get("construct the wrapped model", [0.0])),
            "profile_s_per_step_wall": phases,  # wall time around asynchronous CUDA launches: indicative only
            "peak_memory_mib": torch.cuda.max_memory_allocated() / MiB if cuda else None,
            "batch_per_task": settings["batch"], "tasks": len(CLIP_TASKS), "data_workers": settings["workers"],
            **({"partial": partial} if partial else {})}


def timed_fusion_bench_algorithm(base: type) -> type:
    """FusionBench's algorithm class with timestamps around its own loop, nothing else changed: when the zero-shot
    heads are ready (the loop starts) and at the end of every step (its ``fabric.log_dict`` call, which follows the
    step's ``loss.item()`` and so the GPU's work). The heads are built from the pretrained CLIP model on the loop's
    device (FusionBench's ``setup_zero_shot_classification_head(clip_model=...)``) rather than on the CPU."""
    import torch

    class Timed(base):
        step_ends: list[float]
        loop_start: float
        heads_seconds: float

        def on_test_time_adaptation_start(self) -> None:
            start = time.perf_counter()
            clip_model = self.modelpool.load_clip_model("_pretrained_").to(self.fabric.device)
            self.setup_zero_shot_classification_head(clip_model=clip_model)
            del clip_model
            self.heads_seconds = time.perf_counter() - start
            self.step_ends = []
            log_dict = self.fabric.log_dict

            def log_and_time(metrics: Any, step: int | None = None) -> None:
                log_dict(metrics, step=step)
                self.step_ends.append(time.perf_counter())

            self.fabric.log_dict = log_and_time
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.loop_start = time.perf_counter()

    return Timed


def part_llm_build(work: Path, preset: str) -> dict[str, Any]:
    settings = PRESETS[preset]["llm"]
    return build_causal_lm_pool(work / "llm", shape=settings["shape"], tasks=settings["tasks"], rank=settings["rank"],
                                storage_dtype="bfloat16", device=device_name(), prompts_per_task=settings["prompts"],
                                prompt_words=settings["words"])


def llm_overrides(pool: dict[str, Any], part: str, preset: str, cuda: bool) -> list[str]:
    """``experiment=causal_lm_qwen25_1p5b`` pointed at the pool llm-build wrote, with the part's method and
    streaming; bf16 autocast on a GPU, float32 compute on the CPU."""
    method, streaming = LLM_PARTS[part]
    settings = PRESETS[preset]["llm"]
    overrides = ["experiment=causal_lm_qwen25_1p5b", f"trainer={'gpu' if cuda else 'cpu'}",
                 f"trainer.max_steps={settings['steps']}", f"data.batch_size={settings['batch']}",
                 f"data.num_workers={settings['workers']}", f"modelpool.streaming={streaming}",
                 *cli_overrides(pool, eval_samples=settings["eval_samples"])]
    if method != "adamerging_layer_wise":  # the experiment's layer_groups is an AdaMerging setting
        overrides += [f"method={method}", "~method.layer_groups",
                      f"method.steps_per_block={settings['steps_per_block']}",
                      f"method.samples_per_task={settings['samples_per_task']}",
                      f"method.batch_size={settings['distill_batch']}"]
    # bf16 autocast (the experiment's) is a GPU setting; the CPU smoke keeps float32 compute on bf16 storage
    overrides.append(f"method.autocast_dtype={'bfloat16' if cuda else 'null'}")
    if str(streaming).lower() not in ("false", "none"):  # merged module by module: once a step, not once per task
        overrides.append("task_batching=auto")
    return overrides


def part_llm_run(work: Path, preset: str, part: str) -> dict[str, Any]:
    pool = read_json(work / "parts" / "llm-build.json")
    overrides = llm_overrides(pool, part, preset, cuda=device_name() == "cuda")
    streaming = LLM_PARTS[part][1]
    run = run_adamerge(overrides, work / "llm" / f"run_{part}", work, part)
    return {**adamerge_figures(run),
            "streaming": streaming, "shape": pool["shape"], "parameters": pool["parameters"], "tasks": len(pool["tasks"])}


# --------------------------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------------------------
def part_summary(work: Path, out: Path) -> dict[str, Any]:
    """Every part's JSON, or why it has none (gpu_check.sh's status line and the end of its log)."""
    parts: dict[str, Any] = {}
    for part in PARTS:
        status_path = work / "parts" / f"{part}.status"
        status = json.loads(status_path.read_text()) if status_path.is_file() else {"state": "not run"}
        result_path = work / "parts" / f"{part}.json"
        entry: dict[str, Any] = {"status": status}
        if result_path.is_file():
            entry["result"] = json.loads(result_path.read_text())
        else:
            log = work / "logs" / f"{part}.log"
            child_log = work / "logs" / f"{part}.child.log"
            tails = [p.read_text()[-2000:] for p in (child_log, log) if p.is_file()]
            entry["error_tail"] = "\n".join(tails) if tails else None
        parts[part] = entry
    summary = {"parts": parts, "derived": derived_figures(parts)}
    from gpu_check_report import summary_markdown  # noqa: E402 -- the sibling report script formats the table

    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    markdown = summary_markdown(summary)
    (out / "gpu_check.md").write_text(markdown + "\n")
    print(markdown)
    return summary


def derived_figures(parts: dict[str, Any]) -> dict[str, Any]:
    """The ratio of FusionBench's seconds per step to adamerge's, where both parts ran."""
    ours = (parts.get("clip-adamerge") or {}).get("result") or {}
    theirs = (parts.get("clip-fusionbench") or {}).get("result") or {}
    if ours.get("seconds_per_step") and theirs.get("seconds_per_step"):
        return {"clip_fusionbench_over_adamerge": theirs["seconds_per_step"] / ours["seconds_per_step"]}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=[*PARTS, "summary"])
    parser.add_argument("--work", type=Path, required=True, help="folder of the pools, runs, parts and logs")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--out", type=Path, help="summary: where gpu_check.json and gpu_check.md go")
    args = parser.parse_args()
    work = args.work.resolve()
    (work / "parts").mkdir(parents=True, exist_ok=True)
    if args.part == "summary":
        if args.out is None:
            parser.error("summary needs --out")
        part_summary(work, args.out.resolve())
        return
    os.environ.update(offline_environment(work))
    # gpu_check.sh's timeout sends SIGTERM to this process alone: the learning parts keep the steps done so far.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    functions = {"env": part_env, "clip-build": part_clip_build, "clip-adamerge": part_clip_adamerge,
                 "clip-fusionbench": part_clip_fusionbench, "llm-build": part_llm_build}
    start = time.perf_counter()
    if args.part in LLM_PARTS:
        result = part_llm_run(work, args.preset, args.part)
    else:
        result = functions[args.part](work, args.preset)
    result["part_seconds"] = time.perf_counter() - start
    (work / "parts" / f"{args.part}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.part}: " + json.dumps({k: v for k, v in result.items()
                                         if k != "command" and not isinstance(v, (dict, list))}))


if __name__ == "__main__":
    main()
