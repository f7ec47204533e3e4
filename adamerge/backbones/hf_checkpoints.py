"""Reading ``transformers`` checkpoints onto an adamerge backbone: loading, key alignment, and the pool that applies it.

Fine-tuned checkpoints rarely have exactly the backbone's keys: a ``BertForSequenceClassification``
file says ``bert.encoder...`` and has a ``classifier``; a ``CLIPModel`` file has a text tower;
checkpoints written by transformers 4.x keep ``vision_model.`` prefixes that 5.x's
``CLIPVisionModel`` no longer has. :func:`align_state_dict` finds the prefix that maps a checkpoint
onto the backbone's keys, drops what the backbone does not have (logged), and fails with a message
naming the checkpoint when the backbone's tensors are not all there. :class:`HFModelPool` applies it
to the pretrained and every fine-tuned checkpoint. The backbones themselves: :mod:`adamerge.backbones.hf`
(text classification, causal LMs) and :mod:`adamerge.backbones.clip`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.pool.checkpoints import CheckpointError, describe_source, load_hf_model, load_state_dict
from adamerge.pool.modelpool import ModelPool
from adamerge.pool.task_vectors import tied_aliases

log = logging.getLogger(__name__)

__all__ = ["HFModelPool", "SOURCE_ATTRIBUTE", "align_state_dict", "cache_dir", "load_checkpoint_state",
           "load_pretrained_model"]

# Set on every model this module loads, so the pool can skip re-reading the same pretrained
# checkpoint and the export can copy the tokenizer / processor next to the merged weights.
SOURCE_ATTRIBUTE = "adamerge_source"


# --- where cached artefacts (zero-shot heads) live ------------------------------------------------
def cache_dir() -> Path:
    """``$ADAMERGE_CACHE_DIR``, else the user cache directory (``~/.cache/adamerge`` on Linux)."""
    override = os.environ.get("ADAMERGE_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("adamerge"))


def _dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if not hasattr(torch, str(dtype)) or not isinstance(getattr(torch, str(dtype)), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use e.g. float32, bfloat16, float16 or auto")
    return getattr(torch, str(dtype))


def load_pretrained_model(source: str | os.PathLike, auto_class: str, *, dtype: Any = None,
                          trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(source)`` with adamerge's offline-aware errors."""
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    model = load_hf_model(source, auto_class, trust_remote_code=trust_remote_code, **kwargs)
    setattr(model, SOURCE_ATTRIBUTE, os.fspath(source))
    return model.eval()


# --- aligning checkpoint keys with the backbone ---------------------------------------------------
def _prefix_votes(state_keys: Iterable[str], expected: set[str]) -> Counter:
    """For every dotted split ``prefix + rest`` of a checkpoint key with ``rest`` expected, one vote."""
    votes: Counter = Counter()
    for key in state_keys:
        if key in expected:
            votes[""] += 1
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in expected:
                votes[".".join(parts[:i]) + "."] += 1
    return votes


def _groups(keys: Iterable[str], depth: int = 2) -> str:
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{name}.* ({n})" if n > 1 else name for name, n in sorted(counts.items()))


def align_state_dict(
    state: Mapping[str, Tensor],
    expected: Iterable[str],
    *,
    source: str = "checkpoint",
    optional: Iterable[str] = (),
    prefixes: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Rename ``state``'s keys onto ``expected`` (the backbone's), dropping what the backbone lacks.

    The mapping is one prefix removed from every key (``""``, ``"bert."``, ``"vision_model."``,
    ``"model."``...), chosen as the prefix that covers the most expected keys (``prefixes`` limits
    the candidates). Keys of ``state`` outside that prefix or not expected are dropped and logged.
    ``optional`` keys (tied aliases that save_pretrained omits) may be missing; any other missing
    key raises :class:`CheckpointError` naming ``source`` and showing both sides' keys.
    """
    expected = list(expected)
    wanted = set(expected)
    optional = set(optional)
    required = wanted - optional
    votes = _prefix_votes(state, wanted)
    if prefixes is not None:
        votes = Counter({p: n for p, n in votes.items() if p in set(prefixes) | {""}})
    if not votes:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit the backbone: none of its {len(state)} keys matches a "
            f"backbone tensor under any prefix. Backbone keys look like {sorted(wanted)[:3]}; the "
            f"checkpoint's look like {sorted(state)[:3]}. Is it a checkpoint of the same architecture?"
        )
    # Most coverage wins; on a tie the shorter prefix (identity first).
    prefix = max(votes, key=lambda p: (votes[p], -len(p)))
    aligned = {key[len(prefix):]: value for key, value in state.items()
               if key.startswith(prefix) and key[len(prefix):] in wanted}
    missing = sorted(required - set(aligned))
    if missing:
        raise CheckpointError(
            f"checkpoint {source!r} does not contain every tensor of the backbone: after removing the "
            f"prefix {prefix!r} it lacks {len(missing)} of {len(required)}, e.g. {missing[:5]}. "
            f"Checkpoint keys look like {sorted(state)[:5]}. Check that the fine-tuned and pretrained "
            f"models share one architecture (and that a CLIP checkpoint is the vision tower of the "
            f"same CLIP model)."
        )
    dropped = [key for key in state if not (key.startswith(prefix) and key[len(prefix):] in wanted)]
    if dropped:
        log.info("checkpoint %s: using keys under prefix %r; not part of the merged backbone: %s",
                 source, prefix, _groups(dropped))
    return aligned


def _is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_checkpoint_state(source: Any, auto_class: str = "AutoModel", *, trust_remote_code: bool = False,
                          dtype: Any = None) -> dict[str, Tensor]:
    """A checkpoint's state dict, read the way transformers itself would read it.

    Hub ids and ``save_pretrained`` directories go through ``<auto_class>.from_pretrained`` so that
    transformers' own key conversions (legacy prefixes, fused experts...) apply; weights the
    checkpoint did not contain (freshly initialised by transformers) are left out, so they can never
    pass for fine-tuned values. Files, modules and state dicts go through
    :func:`adamerge.pool.checkpoints.load_state_dict`.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source)).expanduser()
        from_hub = isinstance(source, str) and not path.exists()
        if _is_hf_directory(path) or from_hub:
            kwargs: dict[str, Any] = {"output_loading_info": True}
            if dtype is not None:
                kwargs["dtype"] = _dtype(dtype)
            # A missing local path is reported as such by load_hf_model; hub failures name the id.
            model, info = load_hf_model(source, auto_class, trust_remote_code=trust_remote_code, **kwargs)
            absent = set(info.get("missing_keys") or ())
            return {k: v.detach() for k, v in model.state_dict().items() if k not in absent}
    return load_state_dict(source, trust_remote_code=trust_remote_code)


class HFModelPool(ModelPool):
    """A :class:`~adamerge.pool.modelpool.ModelPool` whose checkpoints are aligned onto the backbone's keys.

    ``auto_class`` is the transformers class that reads hub ids and ``save_pretrained`` directories
    (``AutoModel`` for CLIP vision towers and text bodies, ``AutoModelForCausalLM`` for LMs).
    ``pretrained`` may name the checkpoint the backbone was built from: it is then not read twice.
    """

    def __init__(self, *args: Any, auto_class: str = "AutoModel", trust_remote_code: bool = False,
                 checkpoint_prefixes: Sequence[str] | None = None, **kwargs: Any) -> None:
        self.auto_class = auto_class
        self.trust_remote_code = trust_remote_code
        self.checkpoint_prefixes = list(checkpoint_prefixes) if checkpoint_prefixes is not None else None
        super().__init__(*args, **kwargs)

    def _expected(self) -> tuple[list[str], set[str]]:
        own = self.backbone.state_dict()
        return list(own), set(tied_aliases(own))

    def load_checkpoint(self, source: Any) -> dict[str, Tensor]:
        """One checkpoint's state dict with exactly the backbone's keys (tied aliases may be absent)."""
        state = load_checkpoint_state(source, self.auto_class, trust_remote_code=self.trust_remote_code)
        expected, aliases = self._expected()
        return align_state_dict(state, expected, source=describe_source(source), optional=aliases,
                                prefixes=self.checkpoint_prefixes)

    def align_names(self, names: list[str], source: Any) -> dict[str, str]:
        """:meth:`load_checkpoint`'s alignment on names only (a lazily read checkpoint): backbone name → its name."""
        expected, aliases = self._expected()
        return align_state_dict({name: name for name in names}, expected, source=describe_source(source),
                                optional=aliases, prefixes=self.checkpoint_prefixes)

    def _load_pretrained(self, source: Any) -> None:
        built_from = getattr(self.backbone, SOURCE_ATTRIBUTE, None)
        if isinstance(source, (str, os.PathLike)) and built_from is not None and _same_source(source, built_from):
            return  # the backbone factory already loaded exactly these weights
        state = self.load_checkpoint(source)
        result = self.backbone.load_state_dict(state, strict=False)
        _, aliases = self._expected()
        missing = [name for name in result.missing_keys if name not in aliases]
        if missing:  # align_state_dict already guarantees this; kept as a last line of defence
            raise CheckpointError(f"pretrained checkpoint {describe_source(source)!r} lacks {missing[:5]}")


def _same_source(a: Any, b: Any) -> bool:
    a, b = os.fspath(a), os.fspath(b)
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
