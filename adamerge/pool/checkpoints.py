"""Loading and validating the checkpoints that get merged.

Every loader returns a plain ``dict[str, Tensor]`` on CPU so the merging code never
has to care where weights came from. Pickled files are always read with
``weights_only=True``: checkpoints are often downloaded from strangers.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adamerge.errors import AdamergeError
from adamerge.storage.manifest import sha256_of_files

if TYPE_CHECKING:  # transformers is slow to import; only pay for it when a model is needed
    import transformers

__all__ = [
    "StateDict",
    "CheckpointError",
    "load_state_dict",
    "describe_source",
    "sha256_of",
    "load_hf_model",
]

StateDict = dict[str, torch.Tensor]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

# save_pretrained layouts, in the order transformers itself prefers them.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# A PEFT adapter directory: its configuration and its factors.
PEFT_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# Hub ids are "name" or "org/name"; anything with more structure is a path.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class CheckpointError(AdamergeError, ValueError):
    """A checkpoint could not be loaded or does not fit the pretrained model."""


def describe_source(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, torch.nn.Module):
        return f"<module {type(source).__name__}>"
    if isinstance(source, Mapping):
        return "<state dict>"
    return f"<{type(source).__name__}>"


def looks_like_path(s: str) -> bool:
    return (
        s.startswith(("/", "./", "../", "~", "\\"))
        or s.lower().endswith(WEIGHT_SUFFIXES)
        or not _HUB_ID_RE.match(s)
    )


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import time; re-reading it here lets
    # users (and tests) switch it on later and fail fast instead of retrying for ~30 s.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _check_tensor_mapping(obj: Any, name: str) -> StateDict:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {name!r} does not contain a state dict "
            f"(got {type(obj).__name__}, expected a mapping of parameter names to tensors)"
        )
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {name!r}: key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {name!r}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        out[key] = value
    return out


def _first_bytes(path: Path, count: int) -> bytes:
    with open(path, "rb") as file:
        return file.read(count)


def _load_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        size, head = path.stat().st_size, _first_bytes(path, 8)
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {e}") from e
    # Checked before safetensors reads it: a foreign file's first 8 bytes, read as the header length, can ask for
    # more memory than exists (a text file gave a bare MemoryError).
    length = int.from_bytes(head, "little") if len(head) == 8 else None
    if length is None or length > size - 8:
        raise CheckpointError(f"{str(path)!r} is not a safetensors file: its first 8 bytes announce a header of "
                              f"{length} bytes in a file of {size} bytes")
    try:
        return load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {e}") from e


def _load_pickle(path: Path) -> StateDict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long and advises weights_only=False, which we never do.
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it contains objects other than tensors and plain "
            f"containers, which cannot be loaded safely (weights_only=True). "
            f"Re-save it as a state dict or .safetensors file. ({first})"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint file {str(path)!r}: {e}") from e
    # Lightning saves {"state_dict": ...}; many training scripts save {"model": ...}.
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    return _check_tensor_mapping(obj, str(path))


def _load_file(path: Path) -> StateDict:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise CheckpointError(
        f"unsupported checkpoint file {str(path)!r}: expected one of {', '.join(WEIGHT_SUFFIXES)}"
    )


def hf_dir_weight_files(directory: Path) -> list[Path]:
    """The weight files of a save_pretrained directory, shards in sorted order."""
    for name in HF_WEIGHT_FILES:
        candidate = directory / name
        if not candidate.is_file():
            continue
        if not name.endswith(".index.json"):
            return [candidate]
        try:
            index = json.loads(candidate.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"malformed shard index {str(candidate)!r}: {e}") from e
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(
                f"shard index {str(candidate)!r} refers to missing files: {', '.join(missing)}"
            )
        return [directory / s for s in shards]
    present = sorted(p.name for p in directory.iterdir())[:10]
    raise CheckpointError(
        f"directory {str(directory)!r} is not a Hugging Face model directory: looked for "
        f"{', '.join(HF_WEIGHT_FILES)}; found {present or 'nothing'}"
    )


def _load_hf_dir(directory: Path) -> StateDict:
    state: StateDict = {}
    for f in hf_dir_weight_files(directory):
        part = _load_file(f)
        dup = state.keys() & part.keys()
        if dup:
            raise CheckpointError(
                f"parameter {sorted(dup)[0]!r} appears in more than one shard of {str(directory)!r}"
            )
        state.update(part)
    return state


def _not_found(path: str) -> CheckpointError:
    return CheckpointError(f"file not found: {path}")


def _hub_error(hub_id: str, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"could not load {hub_id!r} from the Hugging Face hub: the hub could not be reached "
        f"(offline?) or the id does not exist ({type(e).__name__}: {str(e).strip()[:300]}). "
        f"Pass a local path instead: a checkpoint file or a directory written by save_pretrained."
    )


def load_hf_model(
    source: str | os.PathLike,
    auto_class: str = "AutoModel",
    *,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> "transformers.PreTrainedModel":
    import transformers

    cls = getattr(transformers, auto_class, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CheckpointError(f"unknown transformers class {auto_class!r} for {describe_source(source)!r}")
    name = os.fspath(source)
    path = Path(name).expanduser()
    is_local = path.exists()
    if not is_local and (not isinstance(source, str) or looks_like_path(name)):
        raise CheckpointError(f"model directory not found: {name}")
    if not is_local and hub_offline():
        kwargs.setdefault("local_files_only", True)
    try:
        return cls.from_pretrained(
            os.fspath(path) if is_local else name, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as e:  # transformers/hf_hub raise OSError, ValueError, HTTP errors...
        if is_local:
            raise CheckpointError(
                f"cannot load {name!r} with transformers.{auto_class}: {type(e).__name__}: {e}"
            ) from e
        raise _hub_error(name, e) from e


def load_state_dict(
    source: str | os.PathLike | torch.nn.Module | Mapping[str, torch.Tensor],
    *,
    hf_auto_class: str = "AutoModel",
    trust_remote_code: bool = False,
) -> StateDict:
    if isinstance(source, torch.nn.Module):
        # detach() returns views, so tied weights keep sharing storage (deduped downstream).
        return {k: v.detach() for k, v in source.state_dict().items()}
    if isinstance(source, Mapping):
        return _check_tensor_mapping(source, describe_source(source))
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(
            f"cannot load a checkpoint from a {type(source).__name__}: pass a file path, a "
            f"save_pretrained directory, a hub id, an nn.Module or a state dict"
        )
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_hf_dir(path)
    if path.is_file():
        return _load_file(path)
    if not isinstance(source, str) or looks_like_path(name):
        raise _not_found(name)
    model = load_hf_model(name, hf_auto_class, trust_remote_code=trust_remote_code)
    return {k: v.detach() for k, v in model.state_dict().items()}


def sha256_of(source: Any) -> str | None:
    if not isinstance(source, (str, os.PathLike)):
        return None
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_dir() and (path / PEFT_ADAPTER_FILES[0]).is_file():  # a LoRA adapter (adamerge.pool.lora)
        files = [path / name for name in PEFT_ADAPTER_FILES if (path / name).is_file()]
    elif path.is_dir():
        files = hf_dir_weight_files(path)
    elif path.is_file():
        files = [path]
    elif isinstance(source, str) and not looks_like_path(name):
        return None  # a hub id: hashing would mean downloading it
    else:
        raise _not_found(name)
    return sha256_of_files(sorted(files))
