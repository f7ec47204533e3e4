"""Choosing tensors by name: glob or regular-expression patterns over state-dict keys.

Used by the model pool (``include`` / ``exclude``: which entries of the checkpoints take part in a merge) and by
Concrete masks (``mask_patterns``). A pattern matches a name as a glob (``_blocks.*``) or, failing that, as a
regular expression matching the whole name (``_fc\\.(weight|bias)``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

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
