"""Causal LM path, offline: tiny random Llama and GPT-2 models saved with save_pretrained."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import datasets
import pytest
import torch
import transformers
import yaml

from adamerge import load_merged
from adamerge.pool.checkpoints import CheckpointError, load_state_dict
from adamerge.export.writer import export_merged
from adamerge.methods.learned.adamerging import build_learned
from adamerge.backbones.heads import Identity
from adamerge.objectives import ObjectiveError, build_objective
from adamerge.backbones.hf import PromptDataModule, PromptPreprocessor, causal_lm, export_extra_files
from adamerge.backbones.hf_checkpoints import HFModelPool
from adamerge.pool.key_filters import block_layer_groups, resolve_layer_groups

TASKS = ("math", "code")
PROMPTS = {
    "math": [f"what is {a} plus {b}? the answer is" for a in range(6) for b in range(5)],
    "code": [f"def f{a}(x):\n    return x * {a}" + " + 1" * (a % 4) for a in range(30)],
}


def char_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    specials = ["[UNK]", "[BOS]", "[EOS]"]  # no pad token: like GPT-2 and Llama
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                                unk_token="[UNK]")
    fast.save_pretrained(directory)
    return fast


def tiny_config(family: str, vocab: int) -> transformers.PretrainedConfig:
    if family == "llama":
        return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                   bos_token_id=1, eos_token_id=2)


def save_perturbed_copy(pretrained: Path, target: Path, seed: int, scale: float = 0.05) -> None:
    """A 'fine-tuned' checkpoint: the pretrained LM with seeded Gaussian noise on every parameter."""
    generator = torch.Generator().manual_seed(seed)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(pretrained)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    tuned.save_pretrained(target)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm_zoo(request, tmp_path_factory) -> dict[str, Path]:
    family = request.param
    root = tmp_path_factory.mktemp(f"lm_{family}")
    torch.manual_seed(0)
    tokenizer = char_tokenizer(root / "pretrained")
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer))).eval()
    model.save_pretrained(root / "pretrained")
    paths = {"pretrained": root / "pretrained", "family": family}
    for k, task in enumerate(TASKS):
        save_perturbed_copy(root / "pretrained", root / task, seed=k + 1)
        tokenizer.save_pretrained(root / task)
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": PROMPTS[task]})}).save_to_disk(root / "data" / task)
        paths[task], paths[f"data_{task}"] = root / task, root / "data" / task
    return paths


def test_block_layer_groups():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.1.self_attn.q_proj.weight", "model.layers.10.input_layernorm.weight", "model.norm.weight",
             "lm_head.weight"]
    assert block_layer_groups(names) == [3, 0, 0, 1, 2, 4, 5]  # blocks 0, 1, 10 → rows 0-2; the rest after
    assert block_layer_groups(names, other="shared") == [3, 0, 0, 1, 2, 3, 3]
    gpt2 = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]
    assert block_layer_groups(gpt2) == [2, 0, 1]
    assert resolve_layer_groups(None, names) is None and resolve_layer_groups("block", names) == block_layer_groups(names)
    assert resolve_layer_groups({"other": "shared"}, names) == block_layer_groups(names, other="shared")
    with pytest.raises(ValueError, match="block pattern"):
        block_layer_groups(["a.weight", "b.bias"])


def test_prompt_preprocessor_pads_masks_and_shifts(lm_zoo):
    pre = PromptPreprocessor(lm_zoo["pretrained"], text_column="text", max_length=64)
    out = pre({"text": ["ab", "abcd"]})
    ids, mask, labels = out["inputs"]["input_ids"], out["inputs"]["attention_mask"], out["labels"]
    assert ids.shape == (2, 4) and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert labels[0].tolist() == [ids[0, 1].item(), -100, -100, -100]
    assert labels[1, :3].tolist() == ids[1, 1:].tolist() and labels[1, 3] == -100


def _pool(lm_zoo) -> HFModelPool:
    return HFModelPool(
        backbone={"_target_": "adamerge.backbones.hf.causal_lm", "model": str(lm_zoo["pretrained"])},
        finetuned={t: str(lm_zoo[t]) for t in TASKS}, heads={t: Identity() for t in TASKS},
        pretrained=str(lm_zoo["pretrained"]), storage_dtype="bfloat16", auto_class="AutoModelForCausalLM",
    )


def test_blockwise_adamerging_learns_and_exports(lm_zoo, tmp_path):
    pool = _pool(lm_zoo)
    vectors = pool.task_vectors()
    assert vectors.storage_dtype == torch.bfloat16
    if lm_zoo["family"] == "gpt2":  # tied lm_head is merged once, through the embedding
        assert "lm_head.weight" not in vectors.names and "lm_head.weight" in vectors.aliases
    groups = block_layer_groups(vectors.names)
    module = build_learned(
        "adamerging_layer_wise", pool.fresh_backbone(), vectors, pool.heads, lr=0.05, layer_groups="block"
    )
    assert tuple(module.merged.coefficients.shape) == (max(groups) + 1, len(TASKS))
    data = PromptDataModule(
        tasks={t: {"path": str(lm_zoo[f"data_{t}"]), "split": "test"} for t in TASKS}, batch_size=8,
        preprocessor=PromptPreprocessor(lm_zoo["pretrained"], text_column="text", max_length=64))
    data.setup("fit")
    optimizer = module.configure_optimizers()
    stream = iter(data.train_dataloader())
    batch = next(stream)
    history = []
    for _ in range(5):  # one fixed batch: its entropy must go down
        optimizer.zero_grad()
        history.append(sum(module.accumulate_gradients(batch, module.merged_weights()).values()))
        optimizer.step()
        module.after_optimizer_step()
    assert history[-1] < history[0], history
    # Per-token objectives: confident_entropy has a per-token form; information maximisation says it has none.
    module.objective = build_objective("confident_entropy", threshold=1.0)
    assert all(v >= 0 for v in module.accumulate_gradients(batch, module.merged_weights()).values())
    module.objective = build_objective("information_maximization")
    with pytest.raises(ObjectiveError, match="information_maximization.*per-token.*causal language model"):
        module.accumulate_gradients(batch, module.merged_weights())
    assert data.has_labels("math") and next(iter(data.eval_dataloader("math")))["labels"].min() == -100

    merged = module.merge_and_unload()
    extras = export_extra_files(merged, tmp_path / "extras")
    assert "tokenizer.json" in extras
    out = export_merged(merged, tmp_path / "export", merge_config={"method": "adamerging_layer_wise"},
                        extra_files=extras)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    enc = tokenizer(["what is 1 plus 2?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).logits, merged(**enc).logits)


def test_causal_lm_experiment_runs_end_to_end(lm_zoo, tmp_path):
    from hydra import compose, initialize_config_dir

    from adamerge.methods.configs import CONF_DIR
    from adamerge.cli.runner import run

    overrides = [
        "experiment=causal_lm_qwen25_1p5b", f"modelpool.pretrained={lm_zoo['pretrained']}",
        # float32 task vectors: mergekit replays the merge from the checkpoints in float32, which bfloat16 storage
        # (the experiment's) would round away from by ~1e-4 here.
        "modelpool.backbone.dtype=float32", "modelpool.storage_dtype=float32", "method.autocast_dtype=null",
        "trainer=cpu", "trainer.max_steps=3", "trainer.enable_progress_bar=false", "logger=none",
        "data.num_workers=0",
        "~modelpool.finetuned.instruct", "~modelpool.heads.instruct", "~data.tasks.instruct",
        *[f"modelpool.finetuned.{t}={lm_zoo[t]}" for t in TASKS],
        *[f"data.tasks.{t}.path={lm_zoo['data_' + t]}" for t in TASKS],
        "data.tasks.math.subset=null", "data.tasks.math.preprocessor.text_column=text",
        "data.tasks.code.preprocessor.text_column=text",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    (tmp_path / "run").mkdir()
    row = run(cfg, tmp_path / "run")["rows"][0]
    assert len(row["entropy_history"]) == 3 and set(row["accuracy"]) == set(TASKS)
    assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())  # next-token accuracy on the prompts
    exported = Path(row["export"])
    # The export is a causal LM for transformers, with its tokenizer, and the same model through adamerge.
    lm = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert type(lm).__name__ == type(causal_lm(lm_zoo["pretrained"])).__name__
    enc = tokenizer(["what is 2 plus 3? the answer is"], return_tensors="pt")
    model = load_merged(exported)
    assert model.tasks == list(TASKS) and all(record["kind"] == "identity" for record in
                                              json.loads((exported / "merge_config.json").read_text())["heads"].values())
    with torch.no_grad():
        logits = lm(**enc).logits
        assert torch.equal(model(dict(enc), task="math"), logits)
    assert model.predict(dict(enc), task="code") == logits.argmax(-1).tolist()  # next-token ids
    # The learned per-tensor coefficients, replayable by mergekit (tests/test_mergekit_bridge.py applies such files).
    recipe = yaml.safe_load((exported / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "task_arithmetic" and len(recipe["models"]) == len(TASKS)
    assert json.loads((exported / "merge_config.json").read_text())["mergekit"] == {"config": "mergekit.yaml"}
    if shutil.which("mergekit-yaml"):  # the export's own file through mergekit's command: the exported tensors
        replayed = tmp_path / "mergekit_out"
        subprocess.run(["mergekit-yaml", str(exported / "mergekit.yaml"), str(replayed), "--no-copy-tokenizer",
                        "--quiet"], check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        ours, theirs = lm.state_dict(), load_state_dict(replayed)
        for name, tensor in theirs.items():
            torch.testing.assert_close(tensor.float(), ours[name].float(), rtol=0, atol=1e-6, msg=name)
    card = (exported / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and 'AutoModelForCausalLM.from_pretrained("merged_model")' in card
    assert 'AutoTokenizer.from_pretrained("merged_model")' in card


def test_unreachable_lm_names_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="adamerge-test/no-such-lm"):
        causal_lm("adamerge-test/no-such-lm")
