"""The arguments a backbone passes one of its blocks, captured by a forward pre-hook, and what is done with them
between blocks: pick rows of a batch, join batches, hand a block's output on as the next block's input.

A block is called with its hidden states (first positional argument, or ``hidden_states=``) and whatever else the model
passes it -- attention masks, position embeddings, a key/value cache -- so these helpers treat every batch-sized tensor
argument alike and leave the rest as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from adamerge.training.task_batching import pad_tokens

__all__ = ["batch_size_of", "concat_rows", "first_output", "hidden_states_of", "next_block_arguments",
           "same_hidden_states", "select_argument_rows", "select_rows", "without_cache"]

Arguments = tuple[tuple, dict]

# A decoder layer's key/value cache (a backbone loaded with use_cache=True): each cached call would append to it, so
# one step's keys would meet the next step's graph; a block's step needs none.
_CACHE_ARGUMENTS = ("past_key_value", "past_key_values", "cache", "layer_past")


def without_cache(kwargs: dict) -> dict:
    """The keyword arguments with any key/value cache dropped and ``use_cache`` off."""
    kept = {k: (None if k in _CACHE_ARGUMENTS else v) for k, v in kwargs.items()}
    if "use_cache" in kept:
        kept["use_cache"] = False
    return kept


def first_output(output: Any) -> Any:
    """A block's hidden states out of what it returns (a tensor, or a tuple led by one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def next_block_arguments(arguments: Arguments, output: Any) -> Arguments:
    """The next block's arguments: this block's (first) output in place of the hidden states, the rest unchanged."""
    args, kwargs = arguments
    hidden = first_output(output)
    if args:
        return (hidden, *args[1:]), dict(kwargs)
    return (), {**kwargs, "hidden_states": hidden}


def hidden_states_of(arguments: Arguments) -> Tensor:
    """The hidden states a block was given: its first positional argument, or ``hidden_states=``."""
    args, kwargs = arguments
    return args[0] if args else kwargs["hidden_states"]


def same_hidden_states(a: Arguments, b: Arguments) -> bool:
    """Whether two captures hand a block the same hidden states (to within float noise)."""
    x, y = hidden_states_of(a), hidden_states_of(b)
    return x.shape == y.shape and bool(torch.allclose(x.float(), y.float(), atol=1e-4, rtol=1e-4))


def batch_size_of(arguments: Arguments) -> int:
    """The number of rows of the hidden states."""
    return int(hidden_states_of(arguments).shape[0])


def select_rows(value: Any, index: Tensor) -> Any:
    """Rows ``index`` of a tensor, or of every tensor of a mapping (a tokenizer's batch); anything else as it is."""
    if isinstance(value, Mapping):
        return {k: select_rows(v, index) for k, v in value.items()}
    return value[index.to(value.device)] if isinstance(value, Tensor) else value


def select_argument_rows(arguments: Arguments, index: Tensor, size: int) -> Arguments:
    """Rows ``index`` of every batch-sized tensor argument (attention masks, hidden states); others as they are."""
    def pick(value: Any) -> Any:
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == size:
            return value[index]
        if isinstance(value, tuple):
            return tuple(pick(v) for v in value)
        return value

    args, kwargs = arguments
    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


def concat_rows(parts: list[Any], key: str = "") -> Any:
    """Batches of rows as one: token batches padded to their own longest row (a causal LM's prompts) are right-padded
    to the longest of all -- attention masks with 0, labels with -100, token ids with 0 (masked anyway)."""
    if isinstance(parts[0], Mapping):
        return {k: concat_rows([p[k] for p in parts], k) for k in parts[0]}
    if parts[0].ndim >= 2 and len({p.shape[1:] for p in parts}) > 1:
        length = max(p.shape[1] for p in parts)
        parts = [pad_tokens(p, key, length) for p in parts]
    return torch.cat(parts)
