"""How one learning step runs the K tasks' batches through the merged backbone.

- ``sequential``: one task at a time, forward + backward, so only one task's activations are alive (the
  least memory; what the papers' code does).
- ``joint``: the K batches concatenated into one forward + one backward of the summed objective, split per
  head. The same gradients (every task's objective depends only on its own examples) with K times the
  activations and one large batch instead of K small ones: what keeps a GPU busy. Valid only when examples
  do not interact inside the backbone: a BatchNorm that normalises with *batch* statistics (training mode,
  or ``track_running_stats=False``) would mix the tasks, and is refused.
- ``auto``: joint on CUDA when a probe of one task's activation memory, times K, fits in
  ``AUTO_MEMORY_FRACTION`` of the free device memory; sequential otherwise (on CPU a joint step does the
  same arithmetic with more memory) -- except that a merge made module by module (a streamed pool) is always
  joint: sequentially it would be made K times a step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from adamerge.errors import ConfigError

MODES = ("sequential", "joint", "auto")
AUTO_MEMORY_FRACTION = 0.8


def mixing_modules(module: nn.Module) -> list[str]:
    """Modules that normalise with statistics of the batch, so examples of different tasks would interact."""
    return [name or type(module).__name__ for name, child in module.named_modules()
            if isinstance(child, _BatchNorm) and (child.training or not child.track_running_stats)]


def check_mode_name(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"task_batching={mode!r} is invalid: it must be one of {', '.join(MODES)}")
    return mode


def check_mode(mode: str, backbone: nn.Module) -> str:
    """A valid mode for ``backbone``: joint is refused where examples would interact."""
    if check_mode_name(mode) == "joint" and (mixing := mixing_modules(backbone.eval())):
        raise ConfigError(
            f"task_batching=joint would let examples of different tasks interact: {mixing[:3]} normalise with "
            "batch statistics (BatchNorm without running statistics); use task_batching=sequential"
        )
    return mode


def batch_size(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def token_length(inputs: Any) -> int | None:
    """The sequence length of tokenised inputs (a mapping with ``input_ids``), None for anything else."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    return int(ids.shape[1]) if isinstance(ids, Tensor) and ids.ndim >= 2 else None


def pad_tokens(value: Tensor, key: str, length: int) -> Tensor:
    """Right padding to ``length`` tokens: masked by an attention mask of 0 (labels -100), so a causal LM's or an
    encoder's outputs at the real tokens do not change."""
    if value.ndim < 2 or value.shape[1] == length:
        return value
    fill = -100 if key == "labels" else 0
    return torch.nn.functional.pad(value, (0, 0) * (value.ndim - 2) + (0, length - value.shape[1]), value=fill)


def concatenate(inputs: Sequence[Any], task_names: Sequence[str]) -> Any:
    """One batch from every task's inputs (tensors, or tokenised mappings of tensors: those of different lengths
    are right-padded to the longest, with an attention mask, and :func:`split` crops the outputs back)."""
    if isinstance(inputs[0], Mapping):
        lengths = [token_length(x) for x in inputs]
        if None not in lengths and len(set(lengths)) > 1:
            if any("attention_mask" not in x for x in inputs):
                raise ConfigError("task_batching=joint needs an attention mask to pad the tasks' token batches to one "
                                  "length; use task_batching=sequential")
            longest = max(lengths)
            inputs = [{key: pad_tokens(value, key, longest) if isinstance(value, Tensor) else value
                       for key, value in x.items()} for x in inputs]
        return {key: concatenate([x[key] for x in inputs], task_names) for key in inputs[0]}
    shapes = [tuple(x.shape[1:]) for x in inputs]
    if len(set(shapes)) > 1:
        described = ", ".join(f"{task} {shape}" for task, shape in zip(task_names, shapes))
        raise ConfigError(f"task_batching=joint needs every task's inputs to have one shape apart from the batch "
                          f"size, got {described}; use task_batching=sequential")
    return torch.cat(list(inputs))


def split(features: Any, sizes: Sequence[int], lengths: Sequence[int | None] | None = None) -> list[Any]:
    """The joint batch's backbone output cut back into the tasks' parts (a tensor, or an output's logits); token
    outputs (``[batch, tokens, ...]``) of tasks padded by :func:`concatenate` cropped to their own ``lengths``."""
    tensor = features if isinstance(features, Tensor) else getattr(features, "logits", None)
    if isinstance(tensor, Tensor):
        parts = list(torch.split(tensor, list(sizes)))
        if lengths is not None and tensor.ndim >= 3:
            parts = [part[:, :length] if length is not None else part for part, length in zip(parts, lengths)]
        return parts
    raise ConfigError(f"task_batching=joint cannot split a backbone output of type {type(features).__name__}; "
                      "use task_batching=sequential")


def choose(module: Any, batch: Mapping[str, Mapping[str, Any]], leaves: Mapping[str, Tensor]) -> str:
    """``auto``'s decision on the first step (a fixed mode is returned as it is)."""
    if module.task_batching != "auto":
        return module.task_batching
    if mixing_modules(module.merged.module):
        return "sequential"
    if getattr(module, "merges_per_module", False) and all(
            isinstance(batch[t]["inputs"], Tensor) or token_length(batch[t]["inputs"]) for t in module.task_names):
        # Merging module by module, a sequential step merges (reads every band of every weight) once per task:
        # the K batches go through one forward instead, on any device.
        return "joint"
    if module.device.type != "cuda":
        return "sequential"
    inputs = [batch[task]["inputs"] for task in module.task_names]
    first = inputs[0]
    if not isinstance(first, Tensor) or len({tuple(x.shape[1:]) for x in inputs}) > 1:
        return "sequential"
    torch.cuda.synchronize(module.device)
    base = torch.cuda.memory_allocated(module.device)
    torch.cuda.reset_peak_memory_stats(module.device)
    with module._autocast():
        probe = module.task_logits(module.task_names[0], first, leaves)  # activations kept for backward
    activations = torch.cuda.max_memory_allocated(module.device) - base
    del probe
    free, _ = torch.cuda.mem_get_info(module.device)
    return "joint" if activations * len(inputs) <= AUTO_MEMORY_FRACTION * free else "sequential"
