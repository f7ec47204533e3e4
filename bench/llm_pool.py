"""A causal-LM pool of Qwen2.5 shapes with random weights, written the way the hub ships checkpoints.

``build_causal_lm_pool`` writes, under one folder: ``pretrained/`` (a ``Qwen2ForCausalLM`` of the chosen shape with
seeded random weights, ``save_pretrained`` in the storage dtype, plus a word-level tokenizer), one folder per task
whose weights are the pretrained ones plus a seeded random **low-rank** update on every matrix (and small noise on
vectors: norms, biases) -- the shape of a LoRA-style fine-tune -- and ``data/<task>/`` (a ``datasets`` DatasetDict
with a ``test`` split of generated prompts in a ``text`` column). ``cli_overrides`` points
``adamerge experiment=causal_lm_qwen25_1p5b`` at it.

The weights are random, so the figures it serves are costs (time, memory), never quality. The model is built on the
device given (a GPU builds a 1.5B model in seconds) and written in ``storage_dtype``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Qwen2.5 configurations (config.json of Qwen/Qwen2.5-0.5B and -1.5B), and a tiny one of the same family for tests.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6),
}
TASK_NAMES = ("instruct", "math", "code", "chat", "story", "facts", "poems", "tables")
# Words the generated prompts are made of: the tokenizer's vocabulary is these words and the prompts' punctuation.
WORDS = ("the a of to and in is what how many why when write explain compute solve list give find add subtract "
         "multiply divide number numbers sum product value function code python loop list string return print "
         "story poem short long about cat dog river city tree house friend teacher student question answer step "
         "steps first then next finally table row column data fact facts history science world country year "
         "please briefly simple example result true false plus minus times equals").split()
PUNCTUATION = list("?.,:;()=+-*/")


def qwen2_config(shape: str):
    """The ``transformers.Qwen2Config`` of a named shape."""
    import transformers

    if shape not in SHAPES:
        raise ValueError(f"unknown causal-LM shape {shape!r}; known shapes: {sorted(SHAPES)}")
    return transformers.Qwen2Config(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)


def word_tokenizer(directory: str | Path, words: Sequence[str] = WORDS):
    """A word-level fast tokenizer over ``words`` (split on whitespace and punctuation, digits one by one; unknown
    words -> ``[UNK]``), saved like a hub tokenizer. The hub's tokenizers cannot be fetched offline."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", *PUNCTUATION, *(str(d) for d in range(10))]
    tokens += sorted(set(words) - set(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="[BOS]", eos_token="[EOS]",
                                                pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(directory)
    return fast


def generated_prompts(task: str, count: int, words: int, seed: int) -> list[str]:
    """``count`` prompts of about ``words`` words each, drawn from :data:`WORDS` with a task-specific seed."""
    import numpy as np

    rng = np.random.default_rng([seed, TASK_NAMES.index(task) if task in TASK_NAMES else len(task)])
    prompts = []
    for _ in range(count):
        tokens = list(rng.choice(WORDS, size=words))
        for position in rng.choice(words, size=max(1, words // 8), replace=False):
            tokens[position] = str(rng.integers(0, 1000))  # numbers split into digits by the tokenizer
        prompts.append(" ".join(tokens) + " ?")
    return prompts


def low_rank_update_(model, rank: int, scale: float, seed: int) -> None:
    """Add to every parameter a seeded update of RMS ``scale × RMS(parameter)``: rank-``rank`` for matrices,
    dense for vectors. Tied parameters (Qwen2.5's embedding and LM head) are one parameter and move once."""
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            rms = parameter.float().pow(2).mean().sqrt().clamp_min(1e-3)
            if parameter.ndim == 2:
                rows, cols = parameter.shape
                left = torch.randn(rows, rank, generator=generator, device=device)
                right = torch.randn(rank, cols, generator=generator, device=device)
                update = (left @ right) / rank ** 0.5  # entries of unit variance
            else:
                update = torch.randn(parameter.shape, generator=generator, device=device)
            parameter.add_((scale * rms * update).to(parameter.dtype))


def build_causal_lm_pool(root: str | Path, *, shape: str = "qwen2.5-1.5b", tasks: int = 4, rank: int = 16,
                         scale: float = 0.02, storage_dtype: str = "bfloat16", device: str = "cpu",
                         prompts_per_task: int = 64, prompt_words: int = 48, seed: int = 0) -> dict[str, Any]:
    """Write the pool under ``root`` (see the module docstring); returns its paths and what it holds."""
    import datasets
    import torch
    import transformers

    if not 1 <= tasks <= len(TASK_NAMES):
        raise ValueError(f"tasks must be between 1 and {len(TASK_NAMES)}, got {tasks}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    dtype = getattr(torch, storage_dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"storage_dtype must name a torch floating dtype, got {storage_dtype!r}")
    root = Path(root)
    start = time.perf_counter()
    config = qwen2_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(config).to(dtype).eval()
    pretrained = root / "pretrained"
    model.save_pretrained(pretrained)
    word_tokenizer(pretrained)
    paths: dict[str, Any] = {"pretrained": str(pretrained), "finetuned": {}, "data": {}}
    names = TASK_NAMES[:tasks]
    for k, task in enumerate(names):
        tuned = copy.deepcopy(model)
        low_rank_update_(tuned, rank, scale, seed=seed * 1000 + k + 1)
        tuned.save_pretrained(root / task)
        del tuned
        prompts = generated_prompts(task, prompts_per_task, prompt_words, seed)
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": prompts})}).save_to_disk(root / "data" / task)
        paths["finetuned"][task] = str(root / task)
        paths["data"][task] = str(root / "data" / task)
    info = {
        "shape": shape, "config": SHAPES[shape], "parameters": sum(p.numel() for p in model.parameters()),
        "tasks": list(names), "rank": rank, "scale": scale, "storage_dtype": storage_dtype, "device": device,
        "prompts_per_task": prompts_per_task, "prompt_words": prompt_words, "seed": seed,
        "bytes_on_disk": sum(f.stat().st_size for f in root.rglob("*.safetensors")),
        "build_seconds": time.perf_counter() - start, "paths": paths,
    }
    (root / "pool.json").write_text(json.dumps(info, indent=1))
    return info


def cli_overrides(pool: dict[str, Any], eval_samples: int | None = None) -> list[str]:
    """Hydra overrides that point ``experiment=causal_lm_qwen25_1p5b`` at a pool written by
    :func:`build_causal_lm_pool`: its checkpoints, identity heads, and the generated prompts in ``text``
    (evaluated on ``eval_samples`` of them per task; None: all)."""
    paths = pool["paths"]
    overrides = [f"modelpool.pretrained={paths['pretrained']}", "~modelpool.finetuned", "~modelpool.heads",
                 "~data.tasks"]
    for task, directory in paths["finetuned"].items():
        overrides += [f"+modelpool.finetuned.{task}={directory}",
                      f"+modelpool.heads.{task}._target_=adamerge.backbones.heads.Identity",
                      f"+data.tasks.{task}.path={paths['data'][task]}", f"+data.tasks.{task}.split=test",
                      f"+data.tasks.{task}.preprocessor._target_=adamerge.backbones.hf.PromptPreprocessor",
                      f"+data.tasks.{task}.preprocessor.tokenizer={paths['pretrained']}",
                      f"+data.tasks.{task}.preprocessor.text_column=text",
                      f"+data.tasks.{task}.preprocessor.max_length=256"]
        if eval_samples is not None:
            overrides.append(f"+data.tasks.{task}.max_eval_samples={eval_samples}")
    return overrides
