"""LoRA adapters as task vectors, checked against peft on a tiny Llama: the deltas (scale, rsLoRA), a linear merge
exported as one adapter that PeftModel loads, the refusals, and learning over adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from adamerge.pool.checkpoints import CheckpointError
from adamerge.pool.lora import LoRATaskVectors, save_linear_adapter

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[lora]')")
TASKS = ("alpha", "beta")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _base(directory: Path) -> Path:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def _adapter(base: Path, directory: Path, seed: int, **lora) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tuned = peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS, **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: give both factors values, as training would
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    tuned.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = _base(root / "base")
    return {"base": base,
            "alpha": _adapter(base, root / "alpha", 1, r=4, lora_alpha=8),
            "beta": _adapter(base, root / "beta", 2, r=2, lora_alpha=4, use_rslora=True)}


def _pretrained(zoo) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(zoo["base"]).state_dict()


def _vectors(zoo) -> LoRATaskVectors:
    return LoRATaskVectors.from_adapters(_pretrained(zoo), {t: zoo[t] for t in TASKS}, base_model=str(zoo["base"]))


def test_each_adapter_s_delta_is_peft_s(zoo):
    vectors = _vectors(zoo)
    assert len(vectors.names) == 2 * len(TARGETS)
    for k, task in enumerate(TASKS):
        merged = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(zoo["base"]),
                                                zoo[task]).merge_and_unload().state_dict()
        ours = vectors.state_dict_from_weights(torch.eye(len(TASKS))[k])
        for name in vectors.pretrained:
            torch.testing.assert_close(ours[name], merged[name], rtol=1e-5, atol=1e-6, msg=name)


def test_linear_merge_exports_as_one_adapter_peft_loads(zoo, tmp_path):
    vectors = _vectors(zoo)
    weights = torch.rand(len(vectors.names), len(TASKS), generator=torch.Generator().manual_seed(3))
    out = save_linear_adapter(vectors, weights, tmp_path / "merged")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 and config["lora_alpha"] == 6 and not config["use_rslora"]
    dense = transformers.AutoModelForCausalLM.from_pretrained(zoo["base"])
    dense.load_state_dict(vectors.state_dict_from_weights(weights))
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(zoo["base"]), out)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, dense.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def _edited(zoo, tmp_path, **changes) -> Path:
    copy = tmp_path / "edited"
    copy.mkdir()
    (copy / "adapter_model.safetensors").write_bytes((zoo["alpha"] / "adapter_model.safetensors").read_bytes())
    config = json.loads((zoo["alpha"] / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize("changes,message", [
    ({"use_dora": True}, "use_dora=true: a DoRA adapter"),
    ({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, "was trained on 'meta-llama/Llama-2-7b-hf'"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 8}, r"with r=8 .* must be A \(8, "),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
    ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
    ({"bias": "lora_only"}, "bias='lora_only': trained biases"),
    ({"fan_in_fan_out": True}, "must be A"),  # the factors are of a [out, in] layer, not a transposed (Conv1D) one
])
def test_adapters_that_are_not_b_at_a_scale_are_refused(zoo, tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        LoRATaskVectors.from_adapters(_pretrained(zoo), {"alpha": _edited(zoo, tmp_path, **changes)},
                                      base_model=str(zoo["base"]))


def test_learning_over_adapters_keeps_them_as_factors(zoo):
    from adamerge.errors import ConfigError
    from adamerge.methods.learned.adamerging import build_learned
    from adamerge.methods.registry import get_method
    from adamerge.backbones.heads import Identity
    from adamerge.backbones.hf_checkpoints import HFModelPool

    pool = HFModelPool(backbone={"_target_": "adamerge.backbones.hf.causal_lm", "model": str(zoo["base"])},
                       finetuned={t: str(zoo[t]) for t in TASKS}, heads={t: Identity() for t in TASKS},
                       pretrained=str(zoo["base"]), auto_class="AutoModelForCausalLM")
    vectors = pool.task_vectors()
    assert isinstance(vectors, LoRATaskVectors) and vectors.memory_bytes() < 20_000
    module = build_learned("adamerging_layer_wise", pool.fresh_backbone(), vectors, pool.heads, lr=0.05)
    assert not [n for n, _ in module.merged.named_buffers() if "_task_vector_" in n]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    batch = {t: {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}} for t in TASKS}
    module.accumulate_gradients(batch, module.merged.merged_weights())
    assert module.merged.coefficients.grad.abs().min() > 0  # every targeted weight's row gets a gradient
    with torch.no_grad():
        module.merged.coefficients.uniform_(0.0, 1.0)
    expected = vectors.state_dict_from_weights(module.merged.coefficient_rows().detach())
    for name, tensor in module.merge_and_unload().state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ConfigError, match="dense tensor.*data-free methods run over the adapters block by block"):
        vectors.vectors


def _lora_cases():
    from tests.test_streamed import METHOD_CASES

    # Two adapters here: a per-task scaling has two entries.
    return [(m, {**h, "scaling_coefficient": [0.3, 0.5]} if isinstance(h.get("scaling_coefficient"), list) else h)
            for m, h in METHOD_CASES]


@pytest.mark.parametrize("method,hparams", _lora_cases(), ids=[f"{m}-{'-'.join(map(str, h.values()))}"
                                                               for m, h in _lora_cases()])
def test_every_data_free_method_runs_over_adapters_as_over_their_dense_deltas(zoo, monkeypatch, method, hparams):
    """A data-free merge of an adapter pool equals the same merge of the adapters' dense deltas held in memory, and
    forms them one block at a time (a block's K dense deltas alive together, never the model's)."""
    import weakref

    from adamerge.methods.registry import get_method
    from adamerge.pool.lora import LoRADenseVectors
    from adamerge.pool.task_vectors import TaskVectors

    vectors = _vectors(zoo)
    view = vectors.as_streamed()
    dense = TaskVectors(list(vectors.task_names), vectors.pretrained, {n: view.stacked(n) for n in vectors.names}, {}, ())
    for k, task in enumerate(TASKS):  # each slice is that adapter's s·B@A (its PEFT delta: test_each_adapter_s_delta_is_peft_s)
        one_hot = torch.zeros(len(TASKS))
        one_hot[k] = 1.0
        for name in vectors.names:
            torch.testing.assert_close(dense.vectors[name][k], vectors.delta(name, one_hot), rtol=0, atol=0)
    spec = get_method(method)
    expected = spec.fn(dense, **spec.resolve_hparams(hparams))
    alive: list[weakref.ref] = []
    most = 0
    original = LoRADenseVectors.stacked

    def tracked(self, name):
        nonlocal most
        alive[:] = [r for r in alive if r() is not None]
        stacked = original(self, name)
        alive.append(weakref.ref(stacked))
        most = max(most, len(alive))
        return stacked

    monkeypatch.setattr(LoRADenseVectors, "stacked", tracked)
    got = spec.fn(vectors, **spec.resolve_hparams(hparams))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=f"{method} {name}")
    assert most <= max(len(block) for block in view.blocks()) < len(vectors.names)


def _logits(output):
    return output if isinstance(output, torch.Tensor) else output.logits


def test_merging_per_module_runs_the_adapters_low_rank_path_with_the_whole_merges_values_and_gradients(zoo, monkeypatch):
    """Over adapters each linear layer computes x θ0ᵀ + ((x Aᵀ)·λ·s) Bᵀ: outputs and ∂/∂λ equal the whole merge's
    (float64), no targeted matrix is formed, and one-hot rows (an expert) give θ0 + τ_k's outputs."""
    from adamerge.backbones.heads import Identity
    from adamerge.backbones.hf_checkpoints import HFModelPool
    from adamerge.methods.learned.adamerging import build_learned
    from adamerge.methods.learned.merged_streamed import LoRAMergedModel
    from adamerge.methods.learned.merged_per_module import merging_per_module

    pool = HFModelPool(backbone={"_target_": "adamerge.backbones.hf.causal_lm", "model": str(zoo["base"])},
                       finetuned={t: str(zoo[t]) for t in TASKS}, heads={t: Identity() for t in TASKS},
                       pretrained=str(zoo["base"]), auto_class="AutoModelForCausalLM")
    vectors = pool.task_vectors()
    module = build_learned("adamerging_layer_wise", pool.fresh_backbone().double(), vectors, pool.heads)
    merged = module.merged.double()
    assert merged.merge_per_module and module.merges_per_module
    with torch.no_grad():
        merged.coefficients.copy_(torch.rand(merged.coefficients.shape, generator=torch.Generator().manual_seed(3),
                                             dtype=torch.float64))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))

    whole = _logits(merged(input_ids=ids, weights=merged.merged_weights()))
    (whole_grad,) = torch.autograd.grad(whole.square().mean(), merged.coefficients)
    formed = []
    real_delta = LoRAMergedModel.task_delta
    monkeypatch.setattr(LoRAMergedModel, "task_delta", lambda self, *a: formed.append(a[0]) or real_delta(self, *a))
    per_module = _logits(merged(input_ids=ids))
    (per_module_grad,) = torch.autograd.grad(per_module.square().mean(), merged.coefficients)
    assert formed == []  # every targeted weight is an nn.Linear here: none formed whole
    torch.testing.assert_close(per_module, whole, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(per_module_grad, whole_grad, rtol=1e-9, atol=1e-12)

    onehot = torch.zeros(len(merged.names), len(TASKS), dtype=torch.float64)
    onehot[:, 1] = 1.0
    with torch.no_grad(), merging_per_module(merged, onehot):
        expert = _logits(merged.module(input_ids=ids))
    reference = transformers.AutoModelForCausalLM.from_pretrained(zoo["base"]).double()
    reference.load_state_dict({n: t.double() for n, t in vectors.state_dict_from_deltas(vectors.task_vector(1)).items()})
    torch.testing.assert_close(expert, reference(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
    for index in range(len(merged.names)):  # a band of one task's dense delta, as the banded path reads it
        torch.testing.assert_close(merged.task_slice(index, 0, (1, 5)),
                                   vectors.task_vector(0)[merged.names[index]][1:5].double(), rtol=1e-6, atol=1e-7)


def test_memory_plan_of_an_adapter_pool_counts_the_adapters(zoo):
    from adamerge.cli.run_memory import plan_for_pool

    vectors = _vectors(zoo)
    plan, run, model = plan_for_pool(zoo["base"], {t: zoo[t] for t in TASKS}, auto_class="AutoModelForCausalLM",
                                     batch_size=2, sequence_length=8, on_device=True)
    assert model.merged_parameters == sum(vectors.pretrained[n].numel() for n in vectors.names)
    assert plan.device["task vectors"] == len(TASKS) * max(
        sum(f.A.numel() + f.B.numel() for f in a.factors.values()) for a in vectors.adapters.values()) * 4


def test_a_run_over_adapters_exports_the_merged_adapter(tmp_path):
    """adamerge over a pool of adapter directories, learned and data-free: the export of a merge linear in the
    adapters (learned layer-wise, task arithmetic, weight averaging) holds the dense merged model and adapter/, which
    PeftModel loads onto the base with the same outputs; TIES's and progressive distillation's exports are the dense
    model alone."""
    import datasets
    from hydra import compose, initialize_config_dir

    from adamerge.methods.configs import CONF_DIR
    from adamerge.cli.runner import run
    from test_causal_lm import PROMPTS, char_tokenizer

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    char_tokenizer(tmp_path / "base")
    overrides = ["experiment=causal_lm_qwen25_1p5b", f"modelpool.pretrained={tmp_path / 'base'}", "trainer=cpu",
                 "modelpool.backbone.dtype=float32", "method.autocast_dtype=null", "trainer.max_steps=2", "logger=none",
                 "trainer.enable_progress_bar=false", "data.num_workers=0", "~modelpool.finetuned", "~modelpool.heads",
                 "~data.tasks"]
    for k, task in enumerate(("math", "code")):
        _adapter(tmp_path / "base", tmp_path / task, k + 1, r=4, lora_alpha=8)
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": PROMPTS[task]})}).save_to_disk(tmp_path / task / "data")
        overrides += [f"+modelpool.finetuned.{task}={tmp_path / task}", f"+modelpool.heads.{task}._target_=adamerge.backbones.heads.Identity",
                      f"+data.tasks.{task}.path={tmp_path / task / 'data'}", f"+data.tasks.{task}.split=test",
                      f"+data.tasks.{task}.preprocessor._target_=adamerge.backbones.hf.PromptPreprocessor",
                      f"+data.tasks.{task}.preprocessor.tokenizer={tmp_path / 'base'}"]
    rows = []
    for name, extra in (("learned", []), ("data_free", ["method=compare", "method.methods=[task_arithmetic,weight_average,ties]",
                                                        "export.static=true"]),
                        ("progressive", ["method=progressive_distillation", "~method.layer_groups",
                                         "method.steps_per_block=2", "method.samples_per_task=4", "method.batch_size=4"])):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, *extra])
        rows += run(cfg, tmp_path / name)["rows"]
    assert [row["method"] for row in rows] == ["adamerging_layer_wise", "task_arithmetic", "weight_average", "ties",
                                               "progressive_distillation"]
    assert not list((tmp_path / "progressive").rglob("checkpoints"))  # its finished blocks' files went with them
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(6))
    for row in rows:
        exported = Path(row["export"])
        record = json.loads((exported / "merge_config.json").read_text())
        if row["method"] in ("ties", "progressive_distillation"):  # not linear in the adapters: the dense model alone
            assert "merged_adapter" not in record and not (exported / "adapter").exists()
            continue
        assert record["merged_adapter"] == "adapter", row["method"]
        dense = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
        adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                                 exported / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(adapted(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_an_adapter_given_by_hub_id_is_read_from_the_hub_cache(zoo, tmp_path, monkeypatch):
    """A pool entry may be a hub id of an adapter: found in the local Hugging Face cache (offline here; online it is
    downloaded), read as the same directory would be. A hub id the cache does not hold as an adapter is not one."""
    import huggingface_hub.constants

    from adamerge.pool.lora import adapter_path, is_adapter_dir

    snapshot = tmp_path / "hub" / "models--someone--alpha-lora" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).write_bytes((zoo["alpha"] / name).read_bytes())
    (tmp_path / "hub" / "models--someone--alpha-lora" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--alpha-lora" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert adapter_path("someone/alpha-lora") == snapshot
    assert not is_adapter_dir("someone/not-cached") and not is_adapter_dir(str(tmp_path / "missing"))
    by_id = LoRATaskVectors.from_adapters(_pretrained(zoo), {"alpha": "someone/alpha-lora", "beta": zoo["beta"]},
                                          base_model=str(zoo["base"]))
    expected = _vectors(zoo)
    for name in expected.names:
        torch.testing.assert_close(by_id.delta(name, torch.tensor([1.0, 0.5])), expected.delta(name, torch.tensor([1.0, 0.5])),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_progressive_distillation_over_adapters_learns_what_it_learns_over_their_dense_deltas(zoo, granularity):
    """Progressive distillation over an adapter pool (each block's merge from the factors, an expert's slice s_k B_k A_k
    formed one task at a time) learns the coefficients it learns over the same adapters' dense deltas in memory."""
    from adamerge.pool.task_vectors import TaskVectors
    from tests.helpers import TensorSplits, make_heads
    from tests.test_progressive import _learn

    vectors = _vectors(zoo)
    view = vectors.as_streamed()
    dense = TaskVectors(list(vectors.task_names), vectors.pretrained, {n: view.stacked(n) for n in vectors.names}, {}, ())
    backbone = transformers.AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    # use_cache left on (adamerge's own causal-LM backbone turns it off): the captured block arguments drop the cache
    splits = TensorSplits({t: torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(k))
                           for k, t in enumerate(TASKS)}, batch_size=4)

    hparams = {"granularity": granularity, "lr": 0.05, "steps_per_block": 3, "samples_per_task": 8, "batch_size": 8}
    expected, got = (_learn(backbone, pool, make_heads(list(TASKS)), splits, **hparams) for pool in (dense, vectors))
    assert type(got.merged).__name__ == "ProgressiveLoRAMergedModel"
    assert not [n for n, _ in got.merged.named_buffers() if "_task_vector_" in n]  # no dense task vector held
    for block in range(got.num_blocks):  # the block loss falls within each block
        losses = [h["objective"] for h in got.history if h["block"] == block]
        assert losses[-1] < losses[0]
    indices = sorted(expected.merged.element_tensors) if granularity == "element" else range(len(vectors.names))
    for index in indices:
        torch.testing.assert_close(got.merged.tensor_coefficients(index), expected.merged.tensor_coefficients(index),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("rename,message", [
    (("q_proj.lora_", "x_proj.lora_"), r"targets 'model.layers.0.self_attn.x_proj.weight', which the pool's model "
                                         r"does not have"),
    (("q_proj.lora_A.weight", "q_proj.lora_embedding_A"), r"is not a LoRA A/B factor of a linear layer"),
    (("q_proj.lora_B.weight", "q_proj.lora_magnitude_vector"), r"is not a LoRA A/B factor of a linear layer"),
])
def test_adapter_weights_that_are_not_factors_of_the_model_s_linear_layers_are_refused(zoo, tmp_path, rename, message):
    """What the weights file holds is checked too: a module the model does not have, an embedding LoRA's factors,
    a DoRA magnitude vector -- each named, with the file it came from."""
    from safetensors.torch import load_file, save_file

    edited = _edited(zoo, tmp_path)
    tensors = load_file(edited / "adapter_model.safetensors")
    old, new = rename
    for key in [k for k in tensors if ".layers.0." in k and old in k]:
        tensors[key.replace(old, new)] = tensors.pop(key)
    save_file(tensors, str(edited / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        LoRATaskVectors.from_adapters(_pretrained(zoo), {"alpha": edited}, base_model=str(zoo["base"]))


def test_a_gpt2_adapter_on_conv1d_layers_is_peft_s_delta(tmp_path):
    """GPT-2's Conv1D layers store their weight transposed (PEFT's fan_in_fan_out): the delta adamerge forms from the
    factors is what peft's own merge gives, and a linear merge exported as one adapter loads in peft with the dense
    merge's outputs."""
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    adapters = {}
    for k, task in enumerate(TASKS):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        tuned = peft.get_peft_model(model, peft.LoraConfig(target_modules=["c_attn", "c_fc"], r=2, lora_alpha=4,
                                                           fan_in_fan_out=True))
        generator = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if "lora_" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        tuned.save_pretrained(tmp_path / task)
        adapters[task] = tmp_path / task
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    vectors = LoRATaskVectors.from_adapters(pretrained, adapters, base_model=str(tmp_path / "base"))
    assert len(vectors.names) == 4 and all(f.fan_in_fan_out for f in vectors.adapters["alpha"].factors.values())
    for k, task in enumerate(TASKS):
        merged = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                                adapters[task]).merge_and_unload().state_dict()
        ours = vectors.state_dict_from_weights(torch.eye(len(TASKS))[k])
        for name in vectors.names:
            torch.testing.assert_close(ours[name], merged[name], rtol=1e-5, atol=1e-6, msg=name)
    weights = torch.rand(len(vectors.names), len(TASKS), generator=torch.Generator().manual_seed(3))
    out = save_linear_adapter(vectors, weights, tmp_path / "merged")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    dense.load_state_dict(vectors.state_dict_from_weights(weights))
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, dense.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
