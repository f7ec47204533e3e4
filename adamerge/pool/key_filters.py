"""Choosing and grouping tensors by name: glob or regular-expression patterns over state-dict keys.

Used by the model pool (``include`` / ``exclude``: which entries of the checkpoints take part in a merge) and by
Concrete masks (``mask_patterns``). A pattern matches a name as a glob (``_blocks.*``) or, failing that, as a
regular expression matching the whole name (``_fc\\.(weight|bias)``). Layer-wise methods share one coefficient
row per transformer block (:func:`block_layer_groups`, :func:`resolve_layer_groups`, ``layer_groups``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

Value = TypeVar("Value")


def matches(name: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # a glob such as "*.weight" is not a valid regular expression
        return False


def _as_list(patterns: Sequence[str] | str) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def select_tensors(names: Sequence[str], patterns: Sequence[str] | str | None, what: str = "mask_patterns") -> list[str]:
    """Names matching any pattern, in order; all names if ``patterns`` is None. ``what`` names the setting in errors."""
    if patterns is None:
        return list(names)
    patterns = _as_list(patterns)
    selected = [name for name in names if any(matches(name, p) for p in patterns)]
    if not selected:
        raise ValueError(f"{what} {patterns} match none of the merged tensors, e.g. {list(names)[:5]}")
    return selected


def drop_excluded(state: Mapping[str, Value], exclude: Sequence[str] | str | None) -> dict[str, Value]:
    """``state`` without the entries whose name matches an ``exclude`` pattern."""
    if not exclude:
        return dict(state)
    patterns = _as_list(exclude)
    return {name: value for name, value in state.items() if not any(matches(name, p) for p in patterns)}


BLOCK_PATTERN = r"\.(?:layers?|h|blocks?)\.(\d+)\."


def block_layer_groups(names: Sequence[str], pattern: str = BLOCK_PATTERN, other: str = "each") -> list[int]:
    """Coefficient row of every merged tensor: one row per block, the rest after them.

    Tensors whose name matches ``pattern`` (its first group is the block index) share the row of
    their block; blocks are numbered densely in index order. The others (embeddings, final norm,
    LM head) get one row each (``other="each"``) or one row together (``other="shared"``), after the
    blocks, in name order of first appearance.
    """
    if other not in ("each", "shared"):
        raise ValueError(f"other must be 'each' or 'shared', got {other!r}")
    regex = re.compile(pattern)
    blocks: list[int | None] = []
    for name in names:
        match = regex.search(name)
        blocks.append(int(match.group(1)) if match else None)
    order = {index: row for row, index in enumerate(sorted({b for b in blocks if b is not None}))}
    if not order:
        raise ValueError(f"no tensor name matches the block pattern {pattern!r}; names look like {list(names)[:3]}")
    groups, next_row = [], len(order)
    for block in blocks:
        if block is not None:
            groups.append(order[block])
        elif other == "shared":
            groups.append(len(order))
        else:
            groups.append(next_row)
            next_row += 1
    return groups


def resolve_layer_groups(spec: Any, names: Sequence[str]) -> list[int] | None:
    """A method config's ``layer_groups`` turned into one row index per merged tensor.

    ``null``/``"tensor"``: one row per tensor (None); ``"block"``: :func:`block_layer_groups`;
    a mapping: keyword arguments of :func:`block_layer_groups` (``pattern``, ``other``);
    a list: used as is.
    """
    if spec is None or spec == "tensor":
        return None
    if spec == "block":
        return block_layer_groups(names)
    if isinstance(spec, Mapping):
        return block_layer_groups(names, **dict(spec))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [int(g) for g in spec]
    raise ValueError(f"layer_groups must be null, 'tensor', 'block', a mapping or a list, got {spec!r}")
