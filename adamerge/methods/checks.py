"""Hyperparameter checks shared by every method's validator.

Each raises ConfigError (a ValueError) naming the method, the hyperparameter and the value, so a bad setting fails in
milliseconds -- before a checkpoint is read -- with a message that says what to change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from adamerge.errors import ConfigError


def fail(method: str, name: str, value: Any, requirement: str) -> ConfigError:
    return ConfigError(f"method {method!r}: hyperparameter {name}={value!r} is invalid: {requirement}")


def is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_range(method: str, name: str, value: Any, *, low_open: bool, high_open: bool, hint: str = "") -> None:
    """``value`` in [0, 1] with the given open ends."""
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    ok = (
        is_number(value)
        and (value > 0 if low_open else value >= 0)
        and (value < 1 if high_open else value <= 1)
    )
    if not ok:
        raise fail(method, name, value, f"must be a number in {interval}{hint}")


def check_choice(method: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise fail(method, name, value, f"must be one of {', '.join(str(c) for c in choices)}")


def check_positive(method: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    if not (is_number(value) and (value >= 0 if allow_zero else value > 0)):
        raise fail(method, name, value, "must be a number >= 0" if allow_zero else "must be a positive number")


def check_bool(method: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise fail(method, name, value, "must be true or false")


def is_count(value: Any, minimum: int = 0) -> bool:
    """An int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_int(method: str, name: str, value: Any, *, minimum: int = 0) -> None:
    if not is_count(value, minimum):
        raise fail(method, name, value, f"must be an integer >= {minimum}")


def check_scaling(method: str, name: str, value: Any, num_tasks: int, *, per_task: bool) -> None:
    """A number, or (``per_task``) a list of one number per task."""
    if is_number(value):
        return
    if per_task and isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_tasks:
            raise fail(method, name, value, f"needs one value per task: {num_tasks} values, got {len(value)}")
        if all(is_number(v) for v in value):
            return
    form = f"a number or a list of {num_tasks} numbers (one per task)" if per_task else "a number"
    raise fail(method, name, value, f"must be {form}")


def check_betas(method: str, value: Any) -> None:
    if not (isinstance(value, Sequence) and len(value) == 2 and all(is_number(b) and 0 <= b < 1 for b in value)):
        raise fail(method, "betas", value, "must be two numbers in [0, 1), e.g. [0.9, 0.999]")


def check_patterns(method: str, name: str, value: Any) -> None:
    """None, a pattern, or a list of patterns (globs / regular expressions)."""
    if value is None or isinstance(value, str):
        return
    if not (isinstance(value, Sequence) and value and all(isinstance(p, str) for p in value)):
        raise fail(method, name, value, "must be null, a pattern or a non-empty list of patterns")


def check_file(method: str, name: str, value: Any) -> None:
    if value is not None and not Path(str(value)).expanduser().is_file():
        raise fail(method, name, value, "must be null or an existing file")


def check_layer_groups(method: str, value: Any) -> None:
    if value is None or value in ("tensor", "block"):
        return
    if isinstance(value, Mapping) and set(value) <= {"pattern", "other"}:
        return
    if isinstance(value, Sequence) and not isinstance(value, str) and all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in value
    ):
        return
    raise fail(method, "layer_groups", value,
               "must be null, 'tensor', 'block', {pattern, other} or a list of row indices >= 0")


AUTOCAST_DTYPES = (None, "bfloat16", "float16")
