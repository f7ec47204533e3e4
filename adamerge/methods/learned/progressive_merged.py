"""Progressive distillation's merged model: one coefficient per task and tensor, or per task and *element*, the
element-wise ones held one block at a time.

Element-wise coefficients are K × the blocks' parameters in float32: for a 7B model and K = 4 about 100 GB, several
times the model. Only the block that learns needs them as parameters (with their gradient and Adam's two moments). A
block not reached yet merges with its starting row (``init_value``, one number per task: nothing is allocated); a
finished block's coefficients are the merge and are kept -- in memory, or, when the pool streams its task vectors
(:meth:`ProgressiveMergedModel.keep_finished_in`), in one raw file per tensor in the method's checkpoint directory,
read back one tensor at a time when that block is merged. So the method's own state is one block's
coefficients whatever the number of blocks, and a resumed run finds the finished blocks where it left them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.errors import AdamergeError
from adamerge.methods.learned.merged import MergedModel
from adamerge.methods.learned.merged_streamed import merged_model_class
from adamerge.pool.task_vectors import TaskVectors
from adamerge.storage.atomic import write_atomic

__all__ = ["FinishedCoefficients", "ProgressiveMergedModel", "progressive_merged_class"]


class _ElementwiseTaskSum(torch.autograd.Function):
    """``Σ_k α_k ⊙ τ_k`` of one merged tensor, its slices ``τ_k`` fetched one task at a time (``fetch(index, k)``) in
    the forward pass and again in the backward pass for ``∂L/∂α_k = ∂L/∂θ ⊙ τ_k``: autograd keeps α and the index,
    never the K slices (nor their float32 copies), so a step holds one slice beyond the gradient of α."""

    @staticmethod
    def forward(ctx: Any, alpha: Tensor, fetch: Callable[[int, int], Tensor], index: int) -> Tensor:
        ctx.fetch, ctx.index, ctx.num_tasks = fetch, index, alpha.shape[0]
        total = torch.zeros(alpha.shape[1:], dtype=alpha.dtype, device=alpha.device)
        for k in range(alpha.shape[0]):
            total.addcmul_(alpha[k], fetch(index, k))  # promotes a stored 16-bit slice as it reads
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        out = torch.empty((ctx.num_tasks, *grad.shape), dtype=grad.dtype, device=grad.device)
        for k in range(ctx.num_tasks):
            torch.mul(grad, ctx.fetch(ctx.index, k), out=out[k])
        return out, None, None


class FinishedCoefficients:
    """The element-wise coefficients of the blocks that have finished learning, ``{tensor index: [K, *shape]}``.

    In memory by default; after :meth:`spill_to` each finished tensor's coefficients are written to
    ``<directory>/block_<b>/tensor_<i>.bin`` as its raw bytes -- atomically (a kill leaves the old file or the new
    one), straight from the tensor's memory, with no serialised copy (K × a 7B model's largest matrix in float32 is
    1.4 GB) -- and only its file, dtype and shape are kept."""

    def __init__(self) -> None:
        self._memory: dict[int, Tensor] = {}
        self._files: dict[int, tuple[Path, torch.dtype, tuple[int, ...]]] = {}  # tensor index -> where and what
        self.directory: Path | None = None

    def spill_to(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def __contains__(self, index: int) -> bool:
        return index in self._memory or index in self._files

    def indices(self) -> list[int]:
        return sorted([*self._memory, *self._files])

    def put(self, block: int, coefficients: Mapping[int, Tensor]) -> None:
        for index, value in coefficients.items():
            value = value.detach()
            if self.directory is None:
                self._memory[index] = value.clone()
                continue
            path = self.directory / f"block_{block:05d}" / f"tensor_{index:05d}.bin"
            write_atomic(path, memoryview(value.cpu().contiguous().view(torch.uint8).reshape(-1).numpy()))
            self._memory.pop(index, None)
            self._files[index] = (path, value.dtype, tuple(value.shape))

    def get(self, index: int, device: torch.device) -> Tensor:
        if index in self._memory:
            return self._memory[index].to(device)
        path, dtype, shape = self._files[index]
        numel = math.prod(shape)
        try:
            if path.stat().st_size != numel * dtype.itemsize:
                raise OSError(f"{path.stat().st_size} bytes, expected {numel * dtype.itemsize}")
            return torch.from_file(str(path), shared=False, size=numel, dtype=dtype).reshape(shape).to(device)
        except (OSError, RuntimeError) as error:
            raise AdamergeError(f"cannot read the learned coefficients of merged tensor {index} from {path} ({error}): "
                                "the run's checkpoint directory was changed while it ran") from error

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the in-memory coefficients, the files' names (their contents are on disk)."""
        return {"memory": dict(self._memory),
                "files": {index: [str(path), str(dtype).removeprefix("torch."), list(shape)]
                          for index, (path, dtype, shape) in self._files.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self._memory = {int(index): value for index, value in state["memory"].items()}
        self._files = {int(index): (Path(path), getattr(torch, dtype), tuple(shape))
                       for index, (path, dtype, shape) in state["files"].items()}
        missing = sorted({str(path) for path, _, _ in self._files.values() if not path.is_file()})
        if missing:
            from adamerge.training.resume import ResumeError

            raise ResumeError(f"the checkpoint's finished blocks are gone: {', '.join(missing[:3])} no longer exist")


class ProgressiveMergedModel(MergedModel):
    """Layer-wise merge whose coefficients may be one per task and *element* (``granularity="element"``).

    ``learned``: per merged tensor, whether it lies in a block (default: all do). Only those get element-wise
    coefficients, when their block learns (:meth:`begin_block`); the tensors outside the blocks keep their row
    (``init_value``, never learned), so the embeddings of a large vocabulary cost nothing here."""

    def __init__(self, module: nn.Module, task_vectors: TaskVectors, *, init_value: Sequence[float],
                 granularity: str, learned: Sequence[bool] | None = None) -> None:
        super().__init__(module, task_vectors, granularity="layer_wise", init_value=list(init_value), clamp=None)
        self.element_wise = granularity == "element"
        learned = [True] * len(self.names) if learned is None else list(learned)
        self.element_tensors = frozenset(i for i, yes in enumerate(learned) if yes) if self.element_wise else frozenset()
        self.learning_block: int | None = None
        self._learning: dict[int, int] = {}  # merged tensor -> its entry of element_coefficients
        self.element_coefficients = nn.ParameterList()  # the learning block's [K, *shape] per tensor
        self.finished = FinishedCoefficients()
        if self.element_wise:
            self.coefficients.requires_grad_(False)  # the rows stay the start of the blocks not reached yet

    # -- the block that learns ----------------------------------------------------------------------
    def learning_parameters(self) -> list[nn.Parameter]:
        return list(self.element_coefficients) if self.element_wise else [self.coefficients]

    def begin_block(self, block: int, indices: Sequence[int]) -> list[nn.Parameter]:
        """Make ``block`` (its merged tensors ``indices``) the one that learns and return what learns now. Element-wise:
        the previous block's coefficients are put with the finished ones and this block's start at its rows."""
        if not self.element_wise or block == self.learning_block:
            self.learning_block = block
            return self.learning_parameters()
        if self._learning:
            self.finished.put(self.learning_block,
                              {index: self.element_coefficients[n] for index, n in self._learning.items()})
            self.element_coefficients, self._learning = nn.ParameterList(), {}  # freed before the next block's exist
        self._allocate(block, indices)
        with torch.no_grad():
            for index, n in self._learning.items():
                row = self.coefficients[index]
                self.element_coefficients[n].copy_(row.reshape(-1, *[1] * (self.element_coefficients[n].ndim - 1)))
        return self.learning_parameters()

    def _allocate(self, block: int, indices: Sequence[int]) -> None:
        shapes = {name: tensor.shape for name, tensor in self.pretrained_tensors().items()}  # θ0's: nothing is fetched
        chosen = [i for i in indices if i in self.element_tensors]
        like, k = self.coefficients, len(self.task_names)  # their device and dtype (float64 in the exactness tests)
        self.element_coefficients = nn.ParameterList(
            [nn.Parameter(like.new_empty(k, *shapes[self.names[i]])) for i in chosen])
        self._learning = {index: n for n, index in enumerate(chosen)}
        self.learning_block = block

    def keep_finished_in(self, directory: str | Path) -> None:
        """Write each finished block's coefficients to ``directory`` instead of keeping them in memory."""
        self.finished.spill_to(directory)

    def block_state(self) -> dict[str, Any]:
        """The learning block and where the finished ones are (the learning block's values are in the state dict)."""
        return {"block": self.learning_block, "learning": sorted(self._learning), "finished": self.finished.state()}

    def load_block_state(self, state: Mapping[str, Any]) -> None:
        """Before the state dict loads: the learning block's parameters in the shapes the checkpoint holds."""
        if self.element_wise and state["block"] is not None:
            self._allocate(int(state["block"]), [int(i) for i in state["learning"]])
        self.learning_block = state["block"]
        self.finished.load_state(state["finished"])

    # -- the merge ----------------------------------------------------------------------------------
    def row_coefficients(self, index: int) -> bool:
        return index not in self._learning and index not in self.finished

    def tensor_coefficients(self, index: int) -> Tensor:
        """What merged tensor ``index`` has: ``[K, *shape]`` (learning or finished, element-wise) or its row ``[K]``."""
        if index in self._learning:
            return self.element_coefficients[self._learning[index]]
        if index in self.finished:
            return self.finished.get(index, self.coefficients.device)
        return self.coefficients[index]

    def task_delta(self, index: int, row: Tensor, shape: torch.Size) -> Tensor:
        if self.row_coefficients(index):
            return super().task_delta(index, row, shape)
        # One task's slice at a time, in the forward and again in the backward (the learning block).
        return _ElementwiseTaskSum.apply(self.tensor_coefficients(index), self.task_slice, index)

    def coefficients_as_list(self) -> list:
        """Per tensor and task: the coefficient (its mean over the tensor's elements when element-wise)."""
        rows = super().coefficients_as_list()
        return [row if self.row_coefficients(i) else self.tensor_coefficients(i).detach().flatten(1).mean(1).cpu().tolist()
                for i, row in enumerate(rows)]


@functools.lru_cache(maxsize=None)
def _progressive_of(base: type[MergedModel]) -> type[MergedModel]:
    return type(f"Progressive{base.__name__}", (ProgressiveMergedModel, base), {})


def progressive_merged_class(task_vectors: Any) -> type[MergedModel]:
    """Progressive distillation's merged model over these task vectors: its element-wise coefficients and block steps,
    with the pool's way of holding (or streaming) the task vectors (:mod:`.merged_streamed`)."""
    base = merged_model_class(task_vectors)
    return ProgressiveMergedModel if base is MergedModel else _progressive_of(base)
