"""Task vectors: the differences between each fine-tuned checkpoint and the pretrained one.

They are stored once, stacked per tensor as ``[K, *shape]``, so that every merge -- static or
learned -- is one batched operation per tensor instead of a Python loop over tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adamerge.pool.key_filters import select_tensors

StateDict = dict[str, Tensor]

# BatchNorm statistics describe the pretrained feature distribution; averaging them across
# fine-tuned models (which ran BN in eval mode) only adds noise, so they stay pretrained.
BATCHNORM_STATISTICS = ("running_mean", "running_var")

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[dtype]


def is_batchnorm_statistic(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BATCHNORM_STATISTICS


def mergeable_names(state: Mapping[str, Tensor], *, merge_batchnorm_statistics: bool = False) -> list[str]:
    """Names of the entries that are merged; the rest (int buffers, BN statistics) come from θ0."""
    return [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and (merge_batchnorm_statistics or not is_batchnorm_statistic(name))
    ]


def tied_aliases(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Map each alias of a tied tensor (same storage, shape and strides) to its first name.

    ``module.state_dict()`` lists a tied weight under every module that uses it; merging each
    name separately would apply the task vector twice when the result is loaded back.
    """
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


@dataclass
class TaskVectors:
    """Stacked task vectors ``τ_k = θ_k − θ_0`` of K tasks over the mergeable tensors of a model.

    ``pretrained`` holds the complete pretrained state (float32 copies of merged tensors are not
    kept twice: merged entries are read from it and cast on use). ``vectors[name]`` has shape
    ``[K, *pretrained[name].shape]`` in ``storage_dtype``; arithmetic on them is float32. ``unscored_tasks`` are
    vectors merged without a task of their own to score (an alignment vector: no head, no data).
    """

    task_names: list[str]
    pretrained: StateDict
    vectors: dict[str, Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    unscored_tasks: tuple[str, ...] = ()

    @classmethod
    def from_state_dicts(
        cls,
        pretrained: Mapping[str, Tensor],
        finetuned: Mapping[str, Mapping[str, Tensor]],
        *,
        storage_dtype: str | torch.dtype = torch.float32,
        merge_batchnorm_statistics: bool = False,
        include: Sequence[str] | None = None,
        sources: Mapping[str, str] | None = None,
        pretrained_source: str = "pretrained",
    ) -> TaskVectors:
        """Validate every fine-tuned state against ``pretrained`` and stack their differences.

        ``include`` patterns restrict the merged tensors; the others keep their pretrained values.
        """
        from adamerge.pool.validation import validate_finetuned

        if not finetuned:
            raise ValueError("at least one fine-tuned checkpoint is needed to form task vectors")
        dtype = resolve_dtype(storage_dtype)
        aliases = tied_aliases(pretrained)
        pretrained = {name: tensor.detach() for name, tensor in pretrained.items() if name not in aliases}
        cleaned = {}
        for task, state in finetuned.items():
            # A save_pretrained file drops tied copies that a module's state_dict keeps: accept both.
            own_aliases = tied_aliases(state)
            state = {
                name: tensor
                for name, tensor in state.items()
                if name not in aliases and not (name in own_aliases and name not in pretrained)
            }
            cleaned[task] = state
            validate_finetuned(
                pretrained, state, source=(sources or {}).get(task, task), pretrained_source=pretrained_source
            )
        names = mergeable_names(pretrained, merge_batchnorm_statistics=merge_batchnorm_statistics)
        if include is not None:
            names = select_tensors(names, include, what="modelpool.include")
        vectors = {}
        for name in names:
            base = pretrained[name].float()
            vectors[name] = torch.stack([state[name].float() - base for state in cleaned.values()]).to(dtype)
        return cls(task_names=list(cleaned), pretrained=pretrained, vectors=vectors, aliases=aliases)

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def shape(self, name: str) -> tuple[int, ...]:
        """Merged tensor ``name``'s shape (streamed and adapter pools give it without forming a task vector)."""
        return tuple(self.vectors[name].shape[1:])

    @property
    def storage_dtype(self) -> torch.dtype:
        return next(iter(self.vectors.values())).dtype

    def memory_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.vectors.values())

    def memory_report(self) -> dict[str, float | int | str]:
        """What the stacked vectors cost, for logs and for choosing a storage dtype."""
        numel = sum(v[0].numel() for v in self.vectors.values())
        return {
            "tasks": self.num_tasks,
            "tensors": len(self.vectors),
            "parameters_per_task": numel,
            "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
            "task_vectors_mb": self.memory_bytes() / 2**20,
            "pretrained_mb": sum(t.numel() * t.element_size() for t in self.pretrained.values()) / 2**20,
        }

    def task_vector(self, task: str | int) -> StateDict:
        index = self.task_names.index(task) if isinstance(task, str) else task
        return {name: v[index].float() for name, v in self.vectors.items()}

    def map(self, transform: Callable[[str, Tensor], Tensor]) -> TaskVectors:
        """New task vectors with ``transform(name, stacked_float32)`` applied per tensor."""
        vectors = {
            name: transform(name, v.float()).to(v.dtype) for name, v in self.vectors.items()
        }
        return TaskVectors(list(self.task_names), self.pretrained, vectors, dict(self.aliases), self.unscored_tasks)

    def select(self, tasks: Sequence[str]) -> TaskVectors:
        index = [self.task_names.index(t) for t in tasks]
        vectors = {name: v[index] for name, v in self.vectors.items()}
        unscored = tuple(t for t in self.unscored_tasks if t in tasks)
        return TaskVectors(list(tasks), self.pretrained, vectors, dict(self.aliases), unscored)

    def to(self, device: torch.device | str) -> TaskVectors:
        return TaskVectors(
            list(self.task_names),
            {n: t.to(device) for n, t in self.pretrained.items()},
            {n: v.to(device) for n, v in self.vectors.items()},
            dict(self.aliases),
            self.unscored_tasks,
        )

    def with_task(self, task: str, vectors: Mapping[str, Tensor], *, scored: bool = True) -> TaskVectors:
        """These task vectors and one more, ``vectors[name]`` (``θ − θ0``, one per merged tensor) appended as the
        last task; ``scored=False`` for a vector without a task of its own (an alignment vector)."""
        if task in self.task_names:
            raise ValueError(f"a task vector named {task!r} is already merged ({self.task_names})")
        missing, extra = sorted(set(self.vectors) - set(vectors)), sorted(set(vectors) - set(self.vectors))
        if missing or extra:
            raise ValueError(f"vector {task!r} does not cover the merged tensors: missing {missing[:5]}, extra {extra[:5]}")
        stacked = {name: torch.cat([v, vectors[name].to(v.dtype).unsqueeze(0)]) for name, v in self.vectors.items()}
        unscored = self.unscored_tasks if scored else (*self.unscored_tasks, task)
        return TaskVectors([*self.task_names, task], self.pretrained, stacked, dict(self.aliases), unscored)

    def state_dict_from_deltas(self, deltas: Mapping[str, Tensor]) -> StateDict:
        """Full state dict: ``θ0 + delta`` for merged tensors, θ0 for the rest, aliases restored.

        Merged tensors are cast back to the pretrained dtype so the result loads into the model.
        """
        missing = [name for name in self.vectors if name not in deltas]
        if missing:
            raise ValueError(f"merge produced no value for {len(missing)} tensors, e.g. {missing[:3]}")
        state = {}
        for name, tensor in self.pretrained.items():
            if name in deltas:
                state[name] = (tensor.float() + deltas[name].float()).to(tensor.dtype)
            else:
                state[name] = tensor.clone()
        for alias, canonical in self.aliases.items():
            state[alias] = state[canonical]
        return state
