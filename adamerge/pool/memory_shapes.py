"""The shapes a memory plan is worked out from (:mod:`adamerge.pool.memory_plan`): the model's, read from the
safetensors headers and config.json before a byte of weights is read, and the run's settings that change its memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adamerge.pool.inventory import DTYPE_BYTES, TensorSpec
from adamerge.pool.key_filters import BLOCK_PATTERN

__all__ = ["DecoderShape", "ModelShape", "RunShape", "decoder_shape", "model_shape"]


@dataclass(frozen=True)
class DecoderShape:
    """A decoder LM's sizes, as in its config.json."""

    hidden: int
    intermediate: int
    layers: int
    kv_hidden: int  # num_key_value_heads × head_dim
    vocab: int

    def layer_bytes_per_token(self, activation_bytes: int) -> int:
        """One decoder layer's share of a learning step's peak, per token.

        autograd saves ``8h + 2kv + 4i`` values per token and layer (q/k/v, rope, attention output and norm inputs;
        k and v; the gated MLP's four intermediates), RMSNorm keeps float32 copies under 16-bit (2h); the peak
        resident memory measured on CPU (bench/memory_plan_check.py, fitted at h=256 with 4 and 12 layers and two
        MLP widths) is ``12h + 2kv + 5.5i``: backward's gradients and the allocator's slack come on top.
        """
        values = 12 * self.hidden + 2 * self.kv_hidden + 11 * self.intermediate // 2
        return activation_bytes * values + max(0, 4 - activation_bytes) * 2 * self.hidden

    def logits_bytes_per_token(self, activation_bytes: int) -> int:
        """The logits and the four float32 tensors of their size the entropy holds (upcast, log-probs, probs,
        product)."""
        return (activation_bytes + 16) * self.vocab


@dataclass(frozen=True)
class ModelShape:
    """The pretrained model, as far as memory goes (from safetensors headers or a meta-device build)."""

    parameters: int  # every tensor of θ0, tied copies once
    model_bytes: int  # θ0 at the backbone's dtype
    merged_parameters: int  # the tensors that are merged
    largest_tensor: int  # elements of the largest merged tensor
    largest_block: int  # merged elements of the largest block (a decoder layer, or a tensor outside the blocks)
    decoder: DecoderShape | None = None
    largest_layer: int = 0  # merged elements of the largest numbered block (what progressive distillation learns)
    layered_parameters: int = 0  # merged elements of all numbered blocks

    @property
    def bytes_per_parameter(self) -> float:
        return self.model_bytes / max(1, self.parameters)


@dataclass(frozen=True)
class RunShape:
    """The run's settings that change its memory."""

    num_tasks: int
    storage_bytes: int  # per task-vector element (modelpool.storage_dtype)
    checkpoint_bytes: int  # one fine-tuned checkpoint as loaded
    activation_bytes: int  # autocast dtype, else the model's
    batch_size: int
    sequence_length: int
    tasks_per_step: int = 1  # task_batching: 1 (sequential) or K (joint)
    coefficient_rows: int = 1
    adapter_parameters: int = 0  # per task: LoRA pools keep adapters, and form one tensor's deltas at a time
    streaming: str | None = None  # modelpool.streaming: None (in memory), "host" or "disk" (adamerge.pool.streamed)
    element_coefficients: bool = False  # progressive distillation's granularity=element: K per element of the blocks
    activation_checkpointing: bool = False  # each decoder layer keeps its input only and runs again in the backward


def decoder_shape(config: Mapping[str, Any] | None) -> DecoderShape | None:
    """The sizes of a decoder LM's config.json (None for other models: no activation formula)."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if config is None or not all(isinstance(config.get(key), int) for key in keys):
        return None
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return DecoderShape(hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                        layers=config["num_hidden_layers"], vocab=config["vocab_size"],
                        kv_hidden=(config.get("num_key_value_heads") or heads) * head_dim)


def model_shape(inventory: Mapping[str, TensorSpec], *, merged: Iterable[str] | None = None,
                parameter_bytes: int | None = None, config: Mapping[str, Any] | None = None) -> ModelShape:
    """The :class:`ModelShape` of a checkpoint's tensors; ``merged`` names the merged ones (default: every floating
    tensor), ``parameter_bytes`` the backbone's dtype when it differs from the checkpoint's."""
    names = [n for n, spec in inventory.items() if spec.is_floating_point] if merged is None else list(merged)
    blocks: dict[str, int] = {}
    for name in names:
        match = re.search(BLOCK_PATTERN, name)
        key = f"block {match.group(1)}" if match else name
        blocks[key] = blocks.get(key, 0) + inventory[name].numel
    model_bytes = sum(spec.numel * (parameter_bytes if parameter_bytes and spec.is_floating_point else
                                    DTYPE_BYTES[spec.dtype]) for spec in inventory.values())
    return ModelShape(
        parameters=sum(spec.numel for spec in inventory.values()), model_bytes=model_bytes,
        merged_parameters=sum(inventory[n].numel for n in names),
        largest_tensor=max((inventory[n].numel for n in names), default=0),
        largest_block=max(blocks.values(), default=0), decoder=decoder_shape(config),
        largest_layer=max((v for k, v in blocks.items() if k.startswith("block ")), default=0),
        layered_parameters=sum(v for k, v in blocks.items() if k.startswith("block ")),
    )
