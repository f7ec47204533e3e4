"""The memory a merge will need, worked out from shapes before a byte of weights is read.

The terms follow what the code holds at its peaks (:mod:`adamerge.pool.modelpool`, :mod:`adamerge.pool.task_vectors`,
:mod:`adamerge.methods.learned.merged`, the learning step of :mod:`adamerge.training.module`):

* **host, loading**: θ0, all K fine-tuned checkpoints (``ModelPool.vectors_of`` reads every one before stacking),
  the stacked task vectors ``[K, ...]`` (storage dtype) and the largest tensor's float32 differences being stacked;
* **host, resident**: θ0 and the task vectors (a learned module on the host shares the pool's θ0,
  ``ModelPool.shared_backbone``; on a device it holds its own copy);
* **device, one learning step** (end to end): the module's copy of θ0, the task vectors, the merged weights and
  their gradients (one per merged tensor, alive together until the merge's own backward), the activations autograd
  saves for the batch, the logits and the float32 copies the entropy takes of them, and Adam's state;
* **device, block by block** (progressive distillation): the same for the largest block only, plus the hidden
  states at the block's input and output -- the working set of a merge that learns one block at a time.
* **streamed** (``modelpool.streaming``): no checkpoint is read whole; ``host`` keeps the task vectors on the host
  (stacking one tensor's K differences at a time while loading), ``disk`` nowhere; the step merges module by module,
  one band of one weight at a time ("task-vector slices": the band, its float32 merge and gradient, whatever K is). Compression (``modelpool.compression``) is not modelled: an upper bound then.

Activations are estimated for decoder LMs (Llama-like: gated MLP, SDPA attention, no ``seq²`` term) from hidden size,
layers, sequence length and batch (autograd's saved tensors per token and layer, counted with ``saved_tensors_hooks``
on transformers' Llama); other backbones get no activation term, and the plan says so. The shapes the terms are
computed from -- the model's, read from checkpoint headers, and the run's settings -- are in
:mod:`adamerge.pool.memory_shapes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from adamerge.pool.memory_shapes import ModelShape, RunShape

GIB = 2**30
BAND_ELEMENTS = 1 << 22  # adamerge.methods.learned.merged_per_module.BAND_ELEMENTS (a test keeps them equal)
WorkingSet = Literal["end_to_end", "progressive"]


@dataclass
class MemoryPlan:
    """Bytes by component: the host's peak and each device's (``device`` empty when everything runs on the host)."""

    host: dict[str, int]
    device: dict[str, int] = field(default_factory=dict)
    device_count: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())

    @property
    def device_peak(self) -> int:
        return sum(self.device.values())

    def fits(self, host_limit: float | None, device_limit: float | None) -> bool:
        host_ok = host_limit is None or self.host_peak <= host_limit
        return host_ok and (device_limit is None or not self.device or self.device_peak <= device_limit)

    def render(self) -> str:
        lines = [f"  host peak {gib(self.host_peak)}: " + _terms(self.host)]
        if self.device:
            each = f" on each of {self.device_count}" if self.device_count > 1 else ""
            lines.append(f"  device peak {gib(self.device_peak)}{each}: " + _terms(self.device))
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])

    def to_json(self) -> dict:
        return {"host": self.host, "device": self.device, "host_peak": self.host_peak,
                "device_peak": self.device_peak, "device_count": self.device_count, "notes": self.notes}


def gib(n: float) -> str:
    """Bytes for people: MiB below 1 GiB, else GiB."""
    return f"{n / 2**20:.1f} MiB" if n < GIB else f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def _terms(parts: dict[str, int]) -> str:
    return " + ".join(f"{name} {gib(n)}" for name, n in parts.items() if n)


def task_vector_bytes(model: ModelShape, run: RunShape) -> int:
    per_task = run.adapter_parameters or model.merged_parameters
    return run.num_tasks * per_task * run.storage_bytes


def loading_peak(model: ModelShape, run: RunShape) -> dict[str, int]:
    """The host while the pool stacks the task vectors (every fine-tuned checkpoint is alive then; streamed: one
    tensor of each)."""
    if run.streaming and not run.adapter_parameters:
        return {
            "frozen model": model.model_bytes,
            "task vectors": task_vector_bytes(model, run) if run.streaming == "host" else 0,
            # host residency stacks each tensor's K differences once; disk never stacks (the step reads bands)
            "stacking buffer": 2 * run.num_tasks * model.largest_tensor * 4 if run.streaming == "host" else 0,
        }
    return {
        "frozen model": model.model_bytes,
        f"{run.num_tasks} checkpoints being read": run.num_tasks * run.checkpoint_bytes,
        "task vectors": task_vector_bytes(model, run),
        # torch.stack of the K float32 differences, and the differences themselves, for one tensor.
        "stacking buffer": 0 if run.adapter_parameters else 2 * run.num_tasks * model.largest_tensor * 4,
    }


def step_working_set(model: ModelShape, run: RunShape, working_set: WorkingSet = "end_to_end") -> dict[str, int]:
    """What one learning step holds where the merged model runs (the task vectors included)."""
    progressive = working_set == "progressive"
    # Progressive distillation learns one numbered block at a time; the tensors outside them (an embedding) are
    # merged module by module, never learned.
    layer = (model.largest_layer or model.largest_block) if progressive else model.merged_parameters
    weight_bytes = int(layer * model.bytes_per_parameter)
    frozen = weight_bytes if progressive else model.model_bytes
    vectors = task_vector_bytes(model, run) * layer // max(1, model.merged_parameters)
    streamed = bool(run.streaming) and not run.adapter_parameters
    # Each coefficient's value, gradient and two Adam moments (float32). Progressive element-wise
    # (adamerge/methods/learned/progressive_merged.py): the learning block's K × elements with their gradient and
    # moments; the finished blocks' are kept in memory too, or, over a streamed pool, written to the run directory.
    if progressive and run.element_coefficients:  # finished blocks go to disk where the merge is per module
        finished = 0 if streamed or run.adapter_parameters else 4 * max(0, model.layered_parameters - layer)
        optimiser = run.num_tasks * (finished + 16 * layer)
    else:
        optimiser = run.coefficient_rows * run.num_tasks * 16
    if streamed and progressive:  # one task's slice of one of the block's tensors at a time, and the block's merge
        return {"frozen model": frozen, "task-vector slices": min(model.largest_tensor, layer) * (run.storage_bytes + 4),
                "merged weights": weight_bytes, "their gradients": weight_bytes, "expert block": weight_bytes,
                "optimiser": optimiser, **activation_bytes(model, run, True)}
    # A streamed pool merges module by module (adamerge.methods.learned.merged_per_module): one band of one weight
    # (BAND_ELEMENTS values) is read, formed in float32 and, in the backward, met by its float32 gradient; the merged
    # model and its gradient are never whole (a norm's few merged values, kept for its backward, are left out).
    # Adapters merge module by module too (LoRAMergedModel): a linear layer runs x θ0ᵀ + ((x Aᵀ)·λ·s) Bᵀ.
    per_module = streamed or (bool(run.adapter_parameters) and not progressive)
    band = min(model.largest_tensor, BAND_ELEMENTS)
    parts = {
        "frozen model": frozen,
        "task vectors": 0 if streamed else vectors,
        "task-vector slices": band * (run.storage_bytes + 12) if streamed else 0,
        "merged weights": 0 if per_module else weight_bytes,
        "their gradients": 0 if per_module else weight_bytes,
        # LoRA: one targeted tensor's B_cat·diag(λ·s)·A_cat, float32, where a module that is not a linear layer owns it.
        "lazy deltas": model.largest_tensor * 4 if run.adapter_parameters else 0,
        # MergedModel.merge_deltas, per tensor: float32 Σ_k λ_k τ_k and θ0 + it; a 16-bit τ is upcast (all K at once).
        "merge buffer": 0 if per_module else (2 + (run.num_tasks if run.storage_bytes < 4 and not run.adapter_parameters
                                                   else 0)) * model.largest_tensor * 4,
        "optimiser": optimiser,
    }
    parts.update(activation_bytes(model, run, progressive))
    return parts


def activation_bytes(model: ModelShape, run: RunShape, progressive: bool = False) -> dict[str, int]:
    shape = model.decoder
    if shape is None:
        return {}
    tokens = run.batch_size * run.sequence_length * run.tasks_per_step
    layer = shape.layer_bytes_per_token(run.activation_bytes)
    if progressive:  # one block's activations, and its input and target hidden states
        return {"activations": tokens * (2 * layer + 2 * shape.hidden * run.activation_bytes)}
    if run.activation_checkpointing:  # every layer's input, the one layer being recomputed and its backward
        return {"activations": tokens * (2 * layer + (shape.layers + 16) * shape.hidden * run.activation_bytes),
                "logits": tokens * shape.logits_bytes_per_token(run.activation_bytes)}
    # Every layer's saved tensors, one more layer's worth while backward runs through it, the embeddings and norms.
    return {"activations": tokens * ((shape.layers + 1) * layer + 16 * shape.hidden),
            "logits": tokens * shape.logits_bytes_per_token(run.activation_bytes)}


def plan_memory(model: ModelShape, run: RunShape, *, on_device: bool, working_set: WorkingSet = "end_to_end",
                devices: int = 1, split_over_devices: bool = False, sharded: bool = False,
                sharded_per_module: bool = True) -> MemoryPlan:
    """The memory plan of a learned merge.

    ``on_device=False``: everything on the host (a CPU run: the task vectors the step uses are the pool's own).
    ``devices`` > 1 replicates the working set on every device (DDP, what ``trainer=ddp`` runs) unless
    ``split_over_devices``, which spreads the blocks over them (a model-parallel layout adamerge does not run yet), or
    ``sharded`` (``trainer=fsdp``, adamerge.training.sharding): θ0 and the task vectors of the merged tensors split
    over the devices; ``sharded_per_module`` (``trainer.strategy.merge_per_module``, the default): each module gathers
    its layer, merges it a band at a time and frees it, so the merged weights and their gradients are never whole;
    otherwise they are (one model's size each), and FSDP2 keeps one layer gathered and the next prefetched.
    """
    loading = loading_peak(model, run)
    step = step_working_set(model, run, working_set)
    notes = [] if model.decoder is not None else ["activations not estimated (only decoder LMs have a formula)"]
    if not on_device:
        # Host-resident streamed task vectors are on the host the step runs on (the step's own term is the slices).
        hosted = ({"task vectors (host)": task_vector_bytes(model, run)}
                  if run.streaming == "host" and not run.adapter_parameters else {})
        # The learned module on the host shares the pool's θ0 (ModelPool.shared_backbone): no second frozen model.
        resident = {"frozen model": model.model_bytes, **hosted,
                    **{f"step: {k}": v for k, v in step.items() if k != "frozen model"}}
        host = max(loading, resident, key=lambda parts: sum(parts.values()))
        return MemoryPlan(host=dict(host), notes=notes)
    host_vectors = task_vector_bytes(model, run) if run.streaming in (None, "host") or run.adapter_parameters else 0
    resident = {"frozen model": model.model_bytes, "task vectors": host_vectors,
                "copy moved to the device": model.model_bytes}
    host = max(loading, resident, key=lambda parts: sum(parts.values()))
    if devices > 1 and split_over_devices:
        step = {name: value if name == "logits" else -(-value // devices) for name, value in step.items()}
    elif devices > 1 and sharded:
        merged_bytes = int(model.merged_parameters * model.bytes_per_parameter)
        step["frozen model"] = step["frozen model"] - merged_bytes + -(-merged_bytes // devices)
        # A streamed pool (disk) is read layer by layer into the shards: on the devices it is sharded like any other.
        step["task vectors"] = -(-task_vector_bytes(model, run) // devices)
        step.pop("task-vector slices", None)
        layer = int(model.largest_tensor * (model.bytes_per_parameter + run.num_tasks * run.storage_bytes))
        if sharded_per_module:  # adamerge.training.sharding: one layer gathered, one band formed with its gradient
            step.update({"merged weights": 0, "their gradients": 0, "merge buffer": 0, "gathered layers": layer,
                         "merge band": min(model.largest_tensor, BAND_ELEMENTS) * 12})
        else:
            step["gathered layers"] = 2 * layer
    if devices > 1 and not split_over_devices:
        # One process per device (trainer=ddp / trainer=fsdp on one node), each loading the pool and holding θ0 and
        # the task vectors on the host before they are moved (and, sharded, split): the node holds that many copies.
        host = {f"{name} (× {devices} processes)": value * devices for name, value in host.items()}
        notes.append(f"{devices} processes on one node, each with its own host copy of the pool")
    return MemoryPlan(host=dict(host), device=step, device_count=devices, notes=notes)


def smallest_fitting_change(run: RunShape, plan_of: Callable[[RunShape], MemoryPlan], host_limit: float | None,
                            device_limit: float | None) -> tuple[list[str], MemoryPlan] | None:
    """The usual memory settings, applied one after the other, up to the first with which the plan fits, as
    ``key=value`` overrides (None if even all of them do not make it fit)."""
    changes: dict[str, str] = {}
    for key, value, changed in _memory_settings(run):
        changes[key] = value
        plan = plan_of(changed)
        if plan.fits(host_limit, device_limit):
            return [f"{k}={v}" for k, v in changes.items()], plan
    return None


def _memory_settings(run: RunShape) -> Iterable[tuple[str, str, RunShape]]:
    """The settings that shrink a run, cheapest first: what costs nothing of the result (storage dtype, one task at a
    time), then reading instead of holding (streamed task vectors, activation checkpointing), then what changes
    the learning (smaller batches; progressive distillation's tensor-wise coefficients)."""
    if run.storage_bytes > 2:
        run = dataclasses.replace(run, storage_bytes=2)
        yield "modelpool.storage_dtype", "bfloat16", run
    if run.tasks_per_step > 1:
        run = dataclasses.replace(run, tasks_per_step=1)
        yield "task_batching", "sequential", run
    if run.streaming != "disk" and not run.adapter_parameters:
        run = dataclasses.replace(run, streaming="disk")
        yield "modelpool.streaming", "disk", run
    if not run.activation_checkpointing:  # the merge is made module by module now (streamed, or adapters)
        run = dataclasses.replace(run, activation_checkpointing=True)
        yield "activation_checkpointing", "true", run
    while run.batch_size > 1:
        run = dataclasses.replace(run, batch_size=run.batch_size // 2)
        yield "data.batch_size", str(run.batch_size), run
    if run.element_coefficients:
        run = dataclasses.replace(run, element_coefficients=False)
        yield "method.granularity", "tensor", run
