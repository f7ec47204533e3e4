"""The memory plan of a configured run, printed and checked before any checkpoint is read.

Shapes come from the checkpoints' safetensors headers (or a cached hub id's config on the meta device, see
:mod:`adamerge.pool.inventory`); settings from the run configuration. A plan that exceeds the host's available
memory or the GPU's free memory (times ``memory_plan.headroom``) is refused with the settings that would make it fit;
``memory_plan.force=true`` runs it anyway.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from adamerge.errors import ConfigError
from adamerge.pool.inventory import (
    DTYPE_BYTES, InventoryUnavailable, TensorSpec, checkpoint_inventory, model_config, safetensors_header,
)
from adamerge.pool.key_filters import drop_excluded, select_tensors
from adamerge.pool.peft_adapter import ADAPTER_WEIGHTS, PEFT_PREFIX, adapter_path, is_adapter_dir
from adamerge.pool.memory_plan import MemoryPlan, WorkingSet, gib, plan_memory, smallest_fitting_change
from adamerge.pool.memory_shapes import RunShape, model_shape
from adamerge.training.host_memory import adapt_to_model
from adamerge.training.sharding import STRATEGY_TARGET

__all__ = ["MemoryPlanError", "plan_for_pool", "plan_for_config", "check_memory_plan", "memory_limits",
           "runs_tasks_jointly", "learned_working_set"]

PROGRESSIVE = "progressive_distillation"


class MemoryPlanError(ConfigError):
    """The run would not fit in the host's or the device's memory."""


def plan_for_pool(pretrained: Any, finetuned: Mapping[str, Any], *, auto_class: str = "AutoModel",
                  backbone_dtype: str | None = None, storage_dtype: str = "float32",
                  include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                  batch_size: int = 1, sequence_length: int = 0, tasks_per_step: int = 1,
                  autocast_dtype: str | None = None, on_device: bool = False,
                  streaming: str | None = None, sharded_devices: int = 1, sharded_per_module: bool = True,
                  activation_checkpointing: bool = False, working_set: WorkingSet = "end_to_end",
                  element_coefficients: bool = False) -> tuple[MemoryPlan, RunShape, Any]:
    """The plan of learning over these checkpoints; also returns the run shape and the model shape (for
    :func:`~adamerge.pool.memory_plan.smallest_fitting_change`). ``working_set="progressive"``: progressive
    distillation's block steps (``element_coefficients``: its element-wise coefficients). Raises
    :class:`InventoryUnavailable` when the shapes cannot be read without loading."""
    inventory = drop_excluded(checkpoint_inventory(pretrained, auto_class), exclude)
    floating = [name for name, spec in inventory.items() if spec.is_floating_point]
    merged = select_tensors(floating, include, what="modelpool.include") if include is not None else floating
    adapters = {task: adapter_inventory(source) for task, source in finetuned.items() if is_adapter_dir(source)}
    if adapters:  # LoRA pool: the targeted weights are merged, the adapters are the task vectors
        merged = [n for n in floating if any(n in targets for targets, _ in adapters.values())]
    parameter_bytes = DTYPE_BYTES[backbone_dtype] if backbone_dtype in DTYPE_BYTES else None
    model = model_shape(inventory, merged=merged, parameter_bytes=parameter_bytes, config=model_config(pretrained))
    checkpoint_bytes = max((adapters[task][1].nbytes if task in adapters else
                            _checkpoint_bytes(source, auto_class, exclude, default=model.model_bytes)
                            for task, source in finetuned.items()), default=0)
    activation = autocast_dtype or backbone_dtype
    run = RunShape(
        num_tasks=len(finetuned), storage_bytes=DTYPE_BYTES[storage_dtype], checkpoint_bytes=checkpoint_bytes,
        activation_bytes=DTYPE_BYTES.get(activation, round(model.bytes_per_parameter)),
        batch_size=batch_size, sequence_length=sequence_length, tasks_per_step=tasks_per_step,
        coefficient_rows=len(merged),
        adapter_parameters=max((spec.numel for _, spec in adapters.values()), default=0), streaming=streaming,
        activation_checkpointing=activation_checkpointing, element_coefficients=element_coefficients,
    )
    return (plan_memory(model, run, on_device=on_device, working_set=working_set, devices=sharded_devices,
                        sharded=sharded_devices > 1, sharded_per_module=sharded_per_module), run, model)


def runs_tasks_jointly(task_batching: str, streaming: str | None, finetuned: Mapping[str, Any]) -> bool:
    """Whether a learning step takes the K tasks' batches in one forward: ``joint``, or ``auto`` over a pool merged
    module by module -- streamed, or of LoRA adapters -- whose merge is then made once a step rather than once per
    task (what :func:`adamerge.training.task_batching.choose` decides on the first step)."""
    per_module = streaming is not None or any(is_adapter_dir(source) for source in finetuned.values())
    return task_batching == "joint" or (task_batching == "auto" and per_module)


def learned_working_set(learned: Sequence[str], hyperparameters: Mapping[str, Mapping[str, Any]]
                        ) -> tuple[WorkingSet, bool]:
    """(the working set a run's learning holds, whether its coefficients are element-wise): progressive
    distillation's block steps when it is the run's only learned method -- one block, one task's cached inputs at a
    time, whatever ``task_batching`` says -- else the end-to-end step (the larger)."""
    if learned and all(name == PROGRESSIVE for name in learned):
        from adamerge.methods.registry import get_method

        granularity = {**get_method(PROGRESSIVE).defaults, **hyperparameters.get(PROGRESSIVE, {})}["granularity"]
        return "progressive", granularity == "element"
    return "end_to_end", False


def _sharding_strategy(cfg: DictConfig) -> tuple[dict, Mapping | None]:
    """(the trainer config, its ``trainer=fsdp`` strategy settings or None)."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") is not None else {}
    strategy = trainer.get("strategy")
    sharded = isinstance(strategy, Mapping) and strategy.get("_target_") == STRATEGY_TARGET
    return trainer, strategy if sharded else None


def sharded_per_module(cfg: DictConfig) -> bool:
    """Whether ``trainer=fsdp`` merges module by module (``trainer.strategy.merge_per_module``, default true)."""
    strategy = _sharding_strategy(cfg)[1]
    return strategy is None or bool(strategy.get("merge_per_module", True))


def sharded_devices(cfg: DictConfig, on_device: bool) -> int:
    """The devices ``trainer=fsdp`` shards θ0 and the task vectors over (1: the run is not sharded)."""
    trainer, strategy = _sharding_strategy(cfg)
    if not on_device or strategy is None:
        return 1
    devices = trainer.get("devices", "auto")
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    import torch

    return max(1, torch.cuda.device_count())  # "auto" / -1: every visible GPU


def adapter_inventory(source: Any) -> tuple[set[str], TensorSpec]:
    """(the backbone weights a PEFT adapter targets, one spec summing its factors) from its safetensors header."""
    header = safetensors_header((adapter_path(source) or Path(os.fspath(source)).expanduser()) / ADAPTER_WEIGHTS)
    targets = {key.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0] + ".weight" for key in header}
    dtype = next(iter(header.values())).dtype if header else "F32"
    return targets, TensorSpec((sum(spec.numel for spec in header.values()),), dtype)


def _checkpoint_bytes(source: Any, auto_class: str, exclude: Sequence[str] | None, default: int) -> int:
    try:
        return sum(spec.nbytes for spec in drop_excluded(checkpoint_inventory(source, auto_class), exclude).values())
    except InventoryUnavailable:
        return default  # a fine-tuned checkpoint of the same architecture: as large as θ0


def _sequence_length(data: Mapping[str, Any]) -> int:
    """The longest ``max_length`` of the data's preprocessors (batches are padded up to it at most)."""
    preprocessors = [data.get("preprocessor")] + [(t or {}).get("preprocessor") for t in (data.get("tasks") or {}).values()]
    lengths = [p.get("max_length") for p in preprocessors if isinstance(p, Mapping)]
    return max((int(n) for n in lengths if isinstance(n, int)), default=0)


def memory_limits(on_device: bool, headroom: float) -> tuple[float | None, float | None]:
    """(host, device) bytes the plan may use: ``headroom`` × available host memory and × free GPU memory."""
    import psutil

    host = headroom * psutil.virtual_memory().available
    if not on_device:
        return host, None
    import torch

    free, _ = torch.cuda.mem_get_info()
    return host, headroom * free


def plan_for_config(cfg: DictConfig, learned: bool, on_device: bool, working_set: WorkingSet = "end_to_end",
                    element_coefficients: bool = False) -> tuple[MemoryPlan, RunShape, Any] | str:
    """The plan of ``cfg``'s run, or why there is none (a pickled checkpoint, a hub id not in the cache...);
    ``working_set``, ``element_coefficients``: see :func:`learned_working_set`."""
    pool = OmegaConf.to_container(cfg.modelpool, resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else {}
    backbone = pool.get("backbone") if isinstance(pool.get("backbone"), Mapping) else {}
    pretrained = pool.get("pretrained") or backbone.get("model")
    if pretrained is None:
        return "the pool names no pretrained checkpoint"
    from adamerge.pool.streamed import streaming_mode

    joint = working_set == "end_to_end" and runs_tasks_jointly(
        cfg.get("task_batching", "sequential"), streaming_mode(pool.get("streaming", False)), pool.get("finetuned") or {})

    try:
        planned = plan_for_pool(
            pretrained, pool.get("finetuned") or {}, auto_class=pool.get("auto_class", "AutoModel"),
            backbone_dtype=backbone.get("dtype"), storage_dtype=pool.get("storage_dtype", "float32"),
            include=pool.get("include"), exclude=pool.get("exclude"),
            batch_size=int(data.get("batch_size", 1)) if learned else 0,
            sequence_length=_sequence_length(data), tasks_per_step=len(pool.get("finetuned") or {}) if joint else 1,
            autocast_dtype=(cfg.get("method") or {}).get("autocast_dtype"), on_device=on_device,
            streaming=streaming_mode(pool.get("streaming", False)), sharded_devices=sharded_devices(cfg, on_device),
            sharded_per_module=sharded_per_module(cfg),
            activation_checkpointing=cfg.get("activation_checkpointing") not in (None, False),
            working_set=working_set, element_coefficients=element_coefficients,
        )
    except InventoryUnavailable as reason:
        return str(reason)
    if pool.get("compression"):
        planned[0].notes.append("modelpool.compression is not modelled: the task-vector terms are the uncompressed "
                                "upper bound")
    return planned


def check_memory_plan(cfg: DictConfig, learned: Sequence[str], on_device: bool,
                      hyperparameters: Mapping[str, Mapping[str, Any]] | None = None) -> MemoryPlan | None:
    """Print the run's memory plan; refuse a run that would not fit (unless ``memory_plan.force``). ``learned``: the
    run's learned methods (none: loading alone is planned), ``hyperparameters`` theirs: what the step holds depends on
    them (:func:`learned_working_set`)."""
    settings = cfg.get("memory_plan") or {}
    if not settings.get("enabled", True):
        return None
    headroom = float(settings.get("headroom", 0.9))
    if not 0 < headroom <= 1:
        raise ConfigError(f"memory_plan.headroom={headroom!r} is invalid: a fraction of free memory in (0, 1]")
    working_set, element = learned_working_set(learned, hyperparameters or {})
    planned = plan_for_config(cfg, bool(learned), on_device, working_set, element)
    if isinstance(planned, str):
        print(f"memory plan: not made ({planned})")
        return None
    plan, run, model = planned
    # A large model's freed tensors go back to the system (the resident set follows what the run holds).
    adapt_to_model(model.model_bytes)
    where = "a GPU" if on_device else "the CPU"
    print(f"memory plan (before loading; {run.num_tasks} tasks, learning on {where}):\n{plan.render()}")
    host_limit, device_limit = memory_limits(on_device, headroom)
    if plan.fits(host_limit, device_limit):
        return plan
    over = [f"host {gib(plan.host_peak)} > {gib(host_limit)}" if plan.host_peak > host_limit else "",
            f"device {gib(plan.device_peak)} > {gib(device_limit)}" if device_limit and plan.device_peak > device_limit
            else ""]
    message = (f"the memory plan exceeds {headroom:.0%} of the free memory ({', '.join(o for o in over if o)})")
    if settings.get("force", False):
        print(f"memory plan: warning: {message}; running anyway (memory_plan.force=true)")
        return plan
    shards, per_module = plan.device_count, sharded_per_module(cfg)
    fix = smallest_fitting_change(run, lambda r: plan_memory(model, r, on_device=on_device, working_set=working_set,
                                                             devices=shards, sharded=shards > 1,
                                                             sharded_per_module=per_module),
                                  host_limit, device_limit)
    advice = (f"it fits with {' '.join(fix[0])} (plan: host {gib(fix[1].host_peak)}"
              + (f", device {gib(fix[1].device_peak)})" if fix[1].device else ")")
              if fix else "no storage dtype, task batching, streaming, activation checkpointing or batch size makes "
                          "it fit: merge fewer tasks" + (", shard over several GPUs (trainer=fsdp trainer.devices=N)"
                                                        if on_device else "") + " or use a larger machine")
    raise MemoryPlanError(f"{message}; {advice}; memory_plan.force=true runs it anyway")
