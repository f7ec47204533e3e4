"""A model pool: the backbone architecture, its pretrained weights, K fine-tuned checkpoints and heads."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from adamerge.errors import ConfigError, adamerge_cause
from adamerge.pool.checkpoints import CheckpointError, describe_source, load_state_dict, sha256_of
from adamerge.pool.compressed import check_compression, compress
from adamerge.pool.key_filters import drop_excluded
from adamerge.pool.lora import LoRATaskVectors, is_adapter_dir
from adamerge.pool.streamed import streaming_mode
from adamerge.pool.streamed_vectors import pool_streamed_vectors
from adamerge.pool.task_vectors import TaskVectors, tied_aliases


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _build_head(task: str, head: nn.Module | Mapping[str, Any]) -> nn.Module:
    if not isinstance(head, Mapping):
        return head
    try:
        return instantiate(head)
    except InstantiationException as error:  # say which setting: the head's own message names only its file
        raise CheckpointError(f"modelpool.heads.{task}: {adamerge_cause(error) or error}") from error


class ModelPool:
    """Everything needed to merge: built from Hydra config or from Python objects.

    ``backbone`` is a module or a ``{"_target_": ...}`` config (kept so the export can rebuild it);
    ``pretrained`` is any checkpoint source of θ0 (default: the backbone's own weights);
    ``finetuned`` maps task name → checkpoint source; ``heads`` maps task name → module or config.
    ``exclude`` patterns drop entries from every checkpoint (and the backbone's state) before validation, so a
    full classification checkpoint can give its backbone (``exclude: ["_fc.*"]``); ``include`` patterns choose
    the tensors that are merged, the others stay pretrained (see :mod:`adamerge.pool.key_filters`).
    ``streaming`` (false, true / ``disk``, ``host``) forms the task vectors one tensor at a time from memory-mapped
    safetensors instead of loading every checkpoint (:mod:`adamerge.pool.streamed_vectors`); ``compression`` (null,
    ``{rank: r}``, ``{rank_fraction: f}``, ``{energy: e}``) keeps them as low-rank factors per matrix
    (:mod:`adamerge.pool.compressed`).
    """

    def __init__(
        self,
        backbone: nn.Module | Mapping[str, Any],
        finetuned: Mapping[str, Any],
        heads: Mapping[str, nn.Module | Mapping[str, Any]],
        pretrained: Any | None = None,
        storage_dtype: str = "float32",
        merge_batchnorm_statistics: bool = False,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        streaming: bool | str = False,
        compression: Mapping[str, Any] | None = None,
    ) -> None:
        backbone, finetuned, heads = _plain(backbone), _plain(finetuned), _plain(heads)
        self.include, self.exclude = _plain(include), _plain(exclude)
        if isinstance(backbone, Mapping):
            self.architecture: dict[str, Any] | None = dict(backbone)
            backbone = instantiate(backbone)
        else:
            self.architecture = None
        if not finetuned:
            raise ConfigError("modelpool.finetuned is empty: give one checkpoint per task")
        missing = sorted(set(finetuned) - set(heads))
        if missing:
            raise ConfigError(f"modelpool.heads has no head for tasks {missing} (heads given: {sorted(heads)})")
        self.backbone = backbone.eval()
        self.pretrained_source = pretrained
        self.finetuned_sources = dict(finetuned)
        self.heads = {task: _build_head(task, h) for task, h in heads.items()}
        self.storage_dtype = storage_dtype
        self.merge_batchnorm_statistics = merge_batchnorm_statistics
        self.streaming, self.compression = streaming_mode(streaming), check_compression(_plain(compression))
        if pretrained is not None:
            self._load_pretrained(pretrained)

    @property
    def task_names(self) -> list[str]:
        return list(self.finetuned_sources)

    def _load_pretrained(self, source: Any) -> None:
        state = drop_excluded(load_state_dict(source), self.exclude)
        result = self.backbone.load_state_dict(state, strict=False)
        # save_pretrained files omit tied copies; anything else missing would silently keep random init.
        tied = set(tied_aliases(self.backbone.state_dict()))
        missing = [name for name in result.missing_keys if name not in tied]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"pretrained checkpoint {describe_source(source)!r} does not fit the backbone "
                f"{type(self.backbone).__name__}: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
            )

    def load_checkpoint(self, source: Any) -> dict:
        """A fine-tuned checkpoint's state, keyed like the backbone (subclasses align other layouts)."""
        return load_state_dict(source)

    def align_names(self, names: list[str], source: Any) -> dict[str, str]:
        """``load_checkpoint``'s key alignment on names only, for a lazily read checkpoint: backbone name → the
        checkpoint's name (here the identity; subclasses that align other layouts override it)."""
        return {name: name for name in names}

    def task_vectors(self, tasks: list[str] | None = None) -> TaskVectors:
        """Load and validate every fine-tuned checkpoint, then stack τ_k = θ_k − θ0."""
        tasks = tasks or self.task_names
        vectors = self.vectors_of({task: self.finetuned_sources[task] for task in tasks})
        if self.compression is not None:  # low-rank factors, formed one tensor at a time (adamerge.pool.compressed)
            vectors = compress(vectors, self.compression)
        return vectors

    def vectors_of(self, sources: Mapping[str, Any]) -> TaskVectors | LoRATaskVectors:
        """``θ − θ0`` of every checkpoint in ``sources`` (name → source), each validated against θ0 first: the
        fine-tuned models' task vectors, or other checkpoints of the same architecture (an aligned model)."""
        pretrained = drop_excluded(self.backbone.state_dict(), self.exclude)
        adapters = [is_adapter_dir(source) for source in sources.values()]
        if any(adapters):
            return self._adapter_vectors(pretrained, sources, all(adapters))
        if self.streaming:  # read one tensor at a time from memory-mapped safetensors (adamerge.pool.streamed_vectors)
            return pool_streamed_vectors(self, pretrained, sources)
        states = {name: drop_excluded(self.load_checkpoint(source), self.exclude) for name, source in sources.items()}
        return TaskVectors.from_state_dicts(
            pretrained,
            states,
            storage_dtype=self.storage_dtype,
            merge_batchnorm_statistics=self.merge_batchnorm_statistics,
            include=self.include,
            sources={name: describe_source(source) for name, source in sources.items()},
            pretrained_source=describe_source(self.pretrained_source or self.backbone),
        )

    def _adapter_vectors(self, pretrained: dict, sources: Mapping[str, Any], only_adapters: bool) -> LoRATaskVectors:
        """A pool of PEFT LoRA adapter directories: task vectors kept as factors (:mod:`adamerge.pool.lora`)."""
        if not only_adapters:
            raise ConfigError("modelpool.finetuned mixes PEFT adapter directories and full checkpoints: give all "
                              f"tasks as adapters or all as checkpoints ({ {n: describe_source(s) for n, s in sources.items()} })")
        if self.include is not None:
            raise ConfigError("modelpool.include cannot choose tensors of a LoRA pool: the adapters' target_modules do")
        base = self.pretrained_source or (self.architecture or {}).get("model")
        return LoRATaskVectors.from_adapters(pretrained, sources, base_model=None if base is None else describe_source(base))

    def fresh_backbone(self) -> nn.Module:
        """An independent copy of the pretrained backbone (merges must not touch the pool's own)."""
        return copy.deepcopy(self.backbone)

    def shared_backbone(self) -> nn.Module:
        """A copy of the pretrained backbone whose parameters share the pool's storage (its buffers are copied).

        For a differentiable merged model, which never writes its module's parameters (its merged weights are new
        tensors every step): it saves one whole model of memory against :meth:`fresh_backbone`. Anything that loads
        weights into the copy must take :meth:`fresh_backbone` instead."""
        memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in self.backbone.parameters()}
        return copy.deepcopy(self.backbone, memo)

    def backbone_with(self, task_vectors: TaskVectors, task: str) -> nn.Module:
        """A copy of the backbone at θ0 + τ_task: the fine-tuned model of ``task`` as every merge sees it (tensors
        that are not merged, such as BatchNorm statistics, stay pretrained)."""
        model = self.fresh_backbone()
        model.load_state_dict(task_vectors.state_dict_from_deltas(task_vectors.task_vector(task)), strict=False)
        return model.eval()

    def backbone_from(self, source: Any) -> nn.Module:
        """A frozen copy of the backbone with the weights of the checkpoint ``source`` (a reference model), which is
        checked against θ0 like a fine-tuned checkpoint."""
        vectors = self.vectors_of({"reference": source})
        return self.backbone_with(vectors, "reference").requires_grad_(False)

    def sources(self) -> dict[str, Any]:
        """Where every checkpoint came from, with content hashes, for merge_config.json."""
        entries = {"pretrained": self.pretrained_source or self.backbone, **self.finetuned_sources}
        return {
            role: {"source": describe_source(source), "sha256": sha256_of(source)}
            for role, source in entries.items()
        }


def pool_from_yaml(path: str | Path) -> ModelPool:
    """The pool a ``conf/modelpool``-style YAML file describes (its ``_target_``: ModelPool or a subclass), built as
    the command builds it: the backbone's ``_target_`` config is kept, so an export can rebuild the backbone."""
    return instantiate(OmegaConf.load(Path(path)), _recursive_=False)
