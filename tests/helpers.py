"""Tiny models and zoos shared by tests."""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """Conv + BatchNorm + linear features, with an int buffer, like a real CNN backbone."""

    def __init__(self, features: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, features)
        self.register_buffer("position_ids", torch.arange(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return torch.tanh(self.fc(h.mean(dim=(2, 3))))


class ScaledHead(nn.Module):
    """A head of a class an export does not know how to rebuild: features × learned per-class scales."""

    def __init__(self, features: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(classes, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.scale.t()


def finetuned_states(module: nn.Module, num_tasks: int, scale: float = 0.1, seed: int = 0) -> dict[str, dict]:
    """Random 'fine-tuned' copies of ``module``: floating entries perturbed, the rest copied."""
    generator = torch.Generator().manual_seed(seed)
    states = {}
    for k in range(num_tasks):
        state = {}
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                state[name] = tensor + scale * noise
            else:
                state[name] = tensor.clone()
        states[f"task{k}"] = state
    return states


def make_heads(task_names, features: int = 6, classes: int = 5, seed: int = 1) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {task: nn.Linear(features, classes) for task in task_names}


def char_tokenizer(directory: Path):
    """A character-level fast tokenizer (any text is tokenisable), saved like a hub tokenizer."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    fast.save_pretrained(directory)
    return fast


# The reduced demo zoo every end-to-end test shares (built once per session by the `zoo` fixture). One build thread:
# the suite runs a worker per core, and two-thread builds on cores the other worker keeps busy spend most of their
# time at OpenMP barriers (a 4-second build took 105 s that way, a 77-second one 877 s).
REDUCED_RECIPE = {
    "threads": 1,
    "train_size": 48,
    "test_size": 32,
    "probe": {"C": 1.0, "max_iter": 50},
    "finetune": {"steps": 3, "batch_size": 8, "lr": 1e-3, "optimizer": "adam", "schedule": "cosine"},
}


def wandb_records(path: str | Path) -> list:
    """The records of an offline wandb run file (``run-<id>.wandb``), as wandb's protobuf ``Record`` messages.

    The file is wandb's append-only log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
    chunks, each with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail
    shorter than a chunk header is zero padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file (header {data[:7]!r})")
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


class TensorSplits:
    """In-memory stand-in for a MultiTaskDataModule's splits (what adamerge.objectives.expert_targets reads): every task's inputs
    are one tensor, the adaptation and evaluation splits are the same rows."""

    def __init__(self, inputs: dict[str, torch.Tensor], batch_size: int = 4):
        self.inputs, self.batch_size = inputs, batch_size

    def split_key(self, task: str, split: int) -> tuple[str, int]:
        return task, 0

    def split_size(self, task: str, split: int) -> int:
        return len(self.inputs[task])

    def split_batches(self, task: str, split: int, batch_size: int | None = None):
        size, rows = batch_size or self.batch_size, self.inputs[task]
        return [{"inputs": rows[start:start + size], "index": torch.arange(start, min(start + size, len(rows)))}
                for start in range(0, len(rows), size)]

    def batch(self, task: str, index: list[int]) -> dict:
        return {"inputs": self.inputs[task][index], "index": torch.as_tensor(index),
                "labels": torch.zeros(len(index), dtype=torch.long)}


def expert_targets_for(backbone: nn.Module, vectors, heads: dict, splits: TensorSplits, needs=("logits", "features")):
    """ExpertTargets over ``splits`` whose expert k is ``backbone`` at θ0 + τ_k with head k."""
    import copy

    from adamerge.objectives.expert_targets import ExpertTargets

    def expert(task: str):
        model = copy.deepcopy(backbone)
        model.load_state_dict(vectors.state_dict_from_deltas(vectors.task_vector(task)), strict=False)
        return model.eval(), heads[task]

    targets = ExpertTargets(expert, splits, torch.device("cpu"), needs)
    targets.prepare(list(splits.inputs), [0, 1])
    return targets
