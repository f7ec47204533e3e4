"""The pool bench/llm_scale.py measures: a Qwen2.5-shaped causal LM with random weights and K fine-tunes of it.

Written once under a work directory and reused (``done.json`` marks a finished build):

* ``pretrained/``: ``Qwen2ForCausalLM`` from the real Qwen2.5-0.5B (or 1.5B) config values, seeded random weights,
  ``save_pretrained`` safetensors (sharded by transformers above its shard size), with a tokenizer;
* ``lora_<task>/``: K PEFT LoRA adapters of that base (rank 8 on every attention and MLP projection, seeded random A
  and B: PEFT starts B at zero, which would make every task vector zero), ``PeftModel.save_pretrained``;
* ``full_<task>/``: the same K fine-tunes as full checkpoints, each the base with its adapter merged in
  (``merge_and_unload``): a random low-rank update on every attention and MLP matrix, so the two pools hold the
  same task vectors;
* ``data/<task>/``: generated text per task, ``datasets.save_to_disk`` (a ``test`` split);
* the tokenizer: a WordLevel tokenizer over the generated text's words (ids well inside the model's vocabulary),
  ``PreTrainedTokenizerFast.save_pretrained``: it loads offline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = ("arith", "story", "code", "recipe", "sums", "tale", "script", "bake")
# The last four are the first four's kinds of text drawn again (other seeds): K = 8 for the memory rows, with the
# tokenizer and so the K <= 4 pools exactly as they were built from the first four alone.
KIND = {"sums": "arith", "tale": "story", "script": "code", "bake": "recipe"}
TOKENIZER_TASKS = TASKS[:4]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The published Qwen2.5 configs (config.json of Qwen/Qwen2.5-0.5B and -1.5B), without the hub.
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
              use_sliding_window=False, bos_token_id=1, eos_token_id=2, hidden_act="silu")
LORA_RANK, LORA_ALPHA, FACTOR_STD = 8, 16, 0.02  # delta entries ~ (alpha/r)·√r·0.02² ≈ 2e-3 against weights ~ 2e-2


def texts(task: str, count: int, seed: int) -> list[str]:
    """``count`` generated lines of one task's kind of text."""
    rng = random.Random(f"{task}-{seed}")
    task = KIND.get(task, task)
    words = ["the", "a", "red", "small", "old", "cat", "dog", "river", "town", "baker", "ran", "saw", "found", "and"]
    lines = []
    for _ in range(count):
        if task == "arith":
            a, b = rng.randrange(100), rng.randrange(100)
            lines.append(f"question : what is {a} plus {b} ? answer : {a + b} . and {a} times 2 is {2 * a} .")
        elif task == "story":
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randrange(24, 48))) + " .")
        elif task == "code":
            n = rng.randrange(10)
            lines.append(f"def f{n} ( x ) : return x * {n} + {rng.randrange(10)} ; print ( f{n} ( {rng.randrange(9)} ) )"
                         + " ; y = y + 1" * rng.randrange(1, 6))
        else:
            lines.append(f"mix {rng.randrange(1, 9)} cups of flour with {rng.randrange(1, 5)} eggs , bake for "
                         f"{rng.randrange(10, 60)} minutes at {rng.randrange(150, 250)} degrees , then "
                         + " ".join(rng.choice(words) for _ in range(rng.randrange(8, 20))) + " .")
    return lines


def build_tokenizer(corpus: list[str], directory: Path):
    """A WordLevel tokenizer over the corpus's words (whitespace-split), saved for ``AutoTokenizer``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[BOS]", "[EOS]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="[BOS]",
                                                eos_token="[EOS]")
    fast.save_pretrained(directory)
    return fast


def build_pool(root: Path, shape: str, tasks: int, *, rows: int = 64, dtype: str = "bfloat16") -> dict[str, Path]:
    """Write (or reuse) the pool under ``root``; returns the paths by role."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    names = TASKS[:tasks]
    paths = {"pretrained": root / "pretrained", "data": root / "data",
             **{f"full_{t}": root / f"full_{t}" for t in names}, **{f"lora_{t}": root / f"lora_{t}" for t in names}}
    marker = root / "done.json"
    recipe = {"shape": shape, "tasks": list(names), "rows": rows, "dtype": dtype, "lora_rank": LORA_RANK}
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return paths
    import datasets
    import peft
    import transformers

    corpora = {t: texts(t, rows, 0) for t in names}
    vocabulary = [line for t in TOKENIZER_TASKS for line in texts(t, rows, 0)]
    tokenizer = build_tokenizer(vocabulary, paths["pretrained"])
    config = transformers.Qwen2Config(**SHAPES[shape], **COMMON)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the generated tokenizer has {len(tokenizer)} words, more than the vocabulary")
    torch.manual_seed(0)
    storage = getattr(torch, dtype)
    transformers.AutoModelForCausalLM.from_config(config).to(storage).save_pretrained(paths["pretrained"])
    for k, task in enumerate(names):
        base = transformers.AutoModelForCausalLM.from_pretrained(paths["pretrained"], dtype=storage)
        lora = peft.get_peft_model(base, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=TARGETS,
                                                         lora_dropout=0.0))
        generator = torch.Generator().manual_seed(1000 + k)
        with torch.no_grad():
            for name, parameter in lora.named_parameters():
                if "lora_" in name:
                    parameter.copy_(FACTOR_STD * torch.randn(parameter.shape, generator=generator))
        lora.save_pretrained(paths[f"lora_{task}"])
        lora.merge_and_unload().save_pretrained(paths[f"full_{task}"])
        tokenizer.save_pretrained(paths[f"full_{task}"])
        del base, lora
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": corpora[task]})}).save_to_disk(
            paths["data"] / task)
    marker.write_text(json.dumps(recipe))
    return paths


def model_bytes(directory: Path) -> int:
    """One checkpoint's size on disk: its safetensors files."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
