"""A backbone's sequence of blocks: the unit progressive distillation learns one at a time and activation
checkpointing recomputes one at a time.

EfficientNet's ``_blocks`` (its MBConv stages), a ViT's or BERT's ``encoder.layer(s)``, a causal LM's
``model.layers``: the ``nn.ModuleList`` holding the most parameters, or the one a setting names.
"""

from __future__ import annotations

from torch import nn

from adamerge.errors import ConfigError

__all__ = ["find_blocks"]


def find_blocks(module: nn.Module, path: str = "auto", *, setting: str = "method.blocks") -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of 2 or more blocks at ``path``, or (``auto``) the one holding the most parameters, with
    its path. ``setting`` names the option that picks another list, for the error messages."""
    lists = {name: child for name, child in module.named_modules()
             if isinstance(child, nn.ModuleList) and len(child) > 1}
    if path != "auto":
        if path not in lists:
            raise ConfigError(f"{setting}={path!r} is not a module list of {type(module).__name__} with 2 or more "
                              f"blocks; module lists: {sorted(lists) or 'none'}")
        return path, lists[path]
    if not lists:
        raise ConfigError(f"{type(module).__name__} has no nn.ModuleList of blocks; set {setting} to the path of the "
                          "module list of its blocks")
    name = max(lists, key=lambda n: sum(p.numel() for p in lists[n].parameters()))
    return name, lists[name]
