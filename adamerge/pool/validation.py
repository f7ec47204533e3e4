"""Is a fine-tuned checkpoint a fine-tuning of this pretrained model? Checked before anything is merged.

Missing or extra entries, a shape or a kind of dtype that differs, a NaN/Inf: each fails naming the checkpoint and
the entry (loading the checkpoints themselves: :mod:`adamerge.pool.checkpoints`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adamerge.pool.checkpoints import CheckpointError

__all__ = ["check_finite", "validate_finetuned"]


def _list_keys(keys: set[str], limit: int = 5) -> str:
    shown = sorted(keys)[:limit]
    more = f", ... ({len(keys)} in total)" if len(keys) > limit else f" ({len(keys)} in total)"
    return ", ".join(repr(k) for k in shown) + more


def validate_finetuned(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    *,
    source: str,
    pretrained_source: str = "pretrained",
) -> None:
    """``finetuned`` is a fine-tuning of ``pretrained``: the same entries, shapes and kinds of dtype, every value
    finite; a CheckpointError names the file (``source``), the entry and what differs."""
    where = f"fine-tuned checkpoint {source!r}"
    theirs = f"the pretrained model {pretrained_source!r}"
    missing = pretrained.keys() - finetuned.keys()
    if missing:
        raise CheckpointError(f"{where} is missing parameters present in {theirs}: {_list_keys(missing)}")
    extra = finetuned.keys() - pretrained.keys()
    if extra:
        raise CheckpointError(f"{where} has parameters not present in {theirs}: {_list_keys(extra)}")
    for key, pre in pretrained.items():
        ft = finetuned[key]
        if tuple(ft.shape) != tuple(pre.shape):
            raise CheckpointError(
                f"{where}: parameter {key!r} has shape {tuple(ft.shape)} but {theirs} has {tuple(pre.shape)}"
            )
        if ft.is_floating_point() != pre.is_floating_point():
            raise CheckpointError(
                f"{where}: parameter {key!r} has dtype {ft.dtype} but {theirs} has {pre.dtype} "
                f"(floating-point and non-floating-point entries cannot be merged)"
            )
        check_finite(key, ft, where)


def check_finite(key: str, tensor: torch.Tensor, where: str) -> None:
    """A NaN/Inf in a checkpoint would spread into every merge that uses it: refuse it, naming the entry (a meta
    tensor, a header's shape and dtype only, is checked when its values are read: adamerge.pool.lazy_checkpoints)."""
    if (tensor.device.type != "meta" and tensor.is_floating_point() and tensor.numel()
            and not bool(torch.isfinite(tensor).all())):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{where}: parameter {key!r} has {bad} non-finite (NaN/Inf) "
            f"value{'s' if bad != 1 else ''} out of {tensor.numel()}"
        )
