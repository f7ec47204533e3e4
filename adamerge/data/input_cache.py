"""Data off the hot path: a task's split preprocessed once into a compact tensor, reused every step.

Learning draws a batch per task per step from the same test split for hundreds of steps, and evaluation
reads it again for every method of a comparison; decoding and resizing images each time would dominate a
fast step. A preprocessor that splits its work into ``encode`` (raw batch → a tensor that stores exactly,
e.g. uint8 pixels) and ``decode`` (that tensor → the model's input, cheap) is cached; others (tokenisers,
whose padding depends on the batch) keep the lazy per-batch path (:class:`LazySplit`), read and preprocessed once up
front by :func:`check_split` so that a bad row is refused before learning either way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from adamerge.data.preprocessing import BadExampleError, labels_of
from adamerge.data.tasks import TaskDataError

log = logging.getLogger(__name__)

ENCODE_BATCH = 256


class Transformed:
    """Applies a task's preprocessor to a raw batch; the task's label column is authoritative."""

    def __init__(self, preprocessor: Callable, label_column: str):
        self.preprocessor, self.label_column = preprocessor, label_column

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(self.preprocessor(batch))
        if (y := labels_of(batch, self.label_column)) is not None:
            out["labels"] = y
        return out


class LazySplit:
    """A split preprocessed batch by batch (not cached) whose bad example, when a batch reaches it, is named by task,
    split and row: what the up-front check (``check_inputs``) reports before learning, for a run that skipped it."""

    def __init__(self, raw: Any, transform: Transformed, where: str):
        self.raw, self.transform, self.where = raw, transform, where
        self.rows = raw.with_transform(transform)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, rows: Any) -> Any:
        indices = list(range(*rows.indices(len(self)))) if isinstance(rows, slice) else rows
        try:
            out = self.rows[rows]
        except Exception as error:
            for row in ([indices] if isinstance(indices, int) else indices):
                try:
                    self.transform(self.raw[row:row + 1])
                except Exception as row_error:
                    raise TaskDataError(f"{self.where}, row {row}: the example cannot be read or preprocessed "
                                        f"({type(row_error).__name__}: {row_error})") from row_error
            raise error
        if isinstance(out, Mapping) and (bad := nonfinite_row(out.get("inputs"))) is not None:
            row = indices if isinstance(indices, int) else indices[bad]
            raise TaskDataError(f"{self.where}, row {row}: its preprocessed input holds NaN/Inf values")
        return out


def cacheable(preprocessor: Any) -> bool:
    return callable(getattr(preprocessor, "encode", None)) and callable(getattr(preprocessor, "decode", None))


class CachedSplit:
    """A split's encoded inputs (and labels) in memory; indexing by an int list or a slice decodes a batch.

    It stands in for the lazily transformed ``datasets`` split: ``split[rows]`` gives ``{"inputs": ...,
    "labels": ...}`` for those rows.
    """

    def __init__(self, encoded: torch.Tensor, labels: torch.Tensor | None, decode: Callable[[torch.Tensor], Any]):
        self.encoded, self.labels, self.decode = encoded, labels, decode

    def __len__(self) -> int:
        return int(self.encoded.shape[0])

    def __getitem__(self, rows: Any) -> dict[str, Any]:
        index = torch.as_tensor(rows) if isinstance(rows, list) else rows
        out = {"inputs": self.decode(self.encoded[index])}
        if self.labels is not None:
            out["labels"] = self.labels[index]
        return out

    @property
    def nbytes(self) -> int:
        return self.encoded.numel() * self.encoded.element_size()


def _without_addresses(error: BaseException) -> str:
    return re.sub(r"\s*<[^<>]+ at 0x[0-9a-fA-F]+>", "", str(error))  # messages stay the same from run to run


def failing_row(batch: Mapping[str, Any], preprocess: Callable[[Any], Any]) -> int | None:
    """The first row of a raw batch (a mapping of columns) that ``preprocess`` fails on alone, if any."""
    rows = len(next(iter(batch.values()))) if batch else 0
    for row in range(rows):
        try:
            preprocess({column: values[row:row + 1] for column, values in batch.items()})
        except Exception:
            return row
    return None


def _read_rows(split: Any, start: int, stop: int) -> Any:
    """``split[start:stop]``; when the dataset cannot decode one of them (a corrupt image file), the row that fails."""
    try:
        return split[start:stop]
    except Exception as error:
        for row in range(start, stop):
            try:
                split[row]
            except Exception as row_error:
                raise BadExampleError(row, f"the example cannot be read ({type(row_error).__name__}: "
                                           f"{_without_addresses(row_error)})") from row_error
        raise error


def nonfinite_row(inputs: Any) -> int | None:
    """The first row of a batch of model inputs (a tensor, or a mapping of them) holding a NaN/Inf value."""
    tensors = inputs.values() if isinstance(inputs, Mapping) else [inputs]
    rows = [int(bad.nonzero()[0]) for t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0
            if (bad := (~torch.isfinite(t.flatten(1) if t.dim() > 1 else t.unsqueeze(1))).any(1)).any()]
    return min(rows) if rows else None


def preprocessed_chunks(split: Any, preprocess: Callable[[Any], Any], inputs_of: Callable[[Any], Any] = lambda x: x,
                        ) -> Iterator[tuple[int, Any]]:
    """``(first row, preprocess(rows))`` over a raw split, ``ENCODE_BATCH`` rows at a time.

    A row that cannot be read or preprocessed, or whose model input holds NaN/Inf (``inputs_of`` picks the input out
    of what ``preprocess`` returns), raises :class:`BadExampleError` with its row in the split.
    """
    for start in range(0, len(split), ENCODE_BATCH):
        batch = _read_rows(split, start, min(start + ENCODE_BATCH, len(split)))
        try:
            part = preprocess(batch)
        except BadExampleError as error:  # its index is within the batch: make it the split's row
            raise BadExampleError(start + error.index, error.problem) from error
        except Exception as error:  # a preprocessor that does not say which row: find it, one row at a time
            row = failing_row(batch, preprocess)
            if row is None:
                raise
            raise BadExampleError(start + row, f"the example cannot be preprocessed ({type(error).__name__}: "
                                               f"{_without_addresses(error)})") from error
        if (row := nonfinite_row(inputs_of(part))) is not None:
            raise BadExampleError(start + row, "its preprocessed input holds NaN/Inf values")
        yield start, part


def check_split(split: Any, preprocess: Callable[[Any], Mapping[str, Any]]) -> None:
    """Read and preprocess every row of a split once, keeping nothing: a split that stays lazy (not cached) is
    checked before learning, so a bad example is refused up front rather than when a batch reaches it."""
    for _ in preprocessed_chunks(split, preprocess, inputs_of=lambda out: out.get("inputs")):
        pass


def encode_split(split: Any, preprocessor: Any, label_column: str, max_bytes: float) -> CachedSplit | None:
    """Encode every row of a raw ``datasets`` split, or None when it would take more than ``max_bytes``."""
    parts: list[torch.Tensor] = []
    total = 0
    for start, part in preprocessed_chunks(split, preprocessor.encode):
        parts.append(part)
        total += part.numel() * part.element_size()
        projected = total * len(split) / min(start + ENCODE_BATCH, len(split))
        if projected > max_bytes:
            log.warning("not caching a split of %d rows: about %.1f GB encoded would exceed what is left of data.cache_max_gb",
                        len(split), projected / 2**30)
            return None
    labels = None
    if label_column in split.column_names:
        labels = torch.as_tensor(np.asarray(split[label_column]))
    return CachedSplit(torch.cat(parts), labels, preprocessor.decode)
