"""mergekit.yaml: applied by mergekit to the same tiny checkpoints, it gives adamerge's tensors (float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml

from adamerge.pool.checkpoints import load_state_dict
from adamerge.methods.learned.merged import MergedModel
from adamerge.export.mergekit_config import mergekit_config, mergekit_yaml
from adamerge.methods.registry import get_method
from adamerge.backbones.heads import Identity
from adamerge.backbones.hf_checkpoints import HFModelPool

mergekit = pytest.importorskip("mergekit.merge", reason="mergekit is not installed (pip install -e '.[mergekit]')")
TASKS = ("alpha", "beta")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama whose every tensor size is a multiple of 8 (so top-k and Breadcrumbs counts are whole)."""
    root = tmp_path_factory.mktemp("mergekit")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at exactly 1: give them values of their own, as a trained model has
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape)) if "norm" in name else None
    model.save_pretrained(root / "pretrained")
    paths = {"pretrained": root / "pretrained"}
    for k, task in enumerate(TASKS):
        generator = torch.Generator().manual_seed(k + 1)
        tuned = transformers.AutoModelForCausalLM.from_pretrained(root / "pretrained")
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        tuned.save_pretrained(root / task)
        paths[task] = root / task
    return paths


def _pool(zoo, include=None) -> HFModelPool:
    return HFModelPool(backbone={"_target_": "adamerge.backbones.hf.causal_lm", "model": str(zoo["pretrained"])},
                       finetuned={t: str(zoo[t]) for t in TASKS}, heads={t: Identity() for t in TASKS},
                       pretrained=str(zoo["pretrained"]), auto_class="AutoModelForCausalLM", include=include)


def _mergekit_tensors(text: str, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    mergekit.run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False,
                                                              quiet=True, random_seed=seed))
    return load_state_dict(out)


def _yaml(pool, vectors, method, hparams, rows=None) -> str:
    merged = set(vectors.names)
    kept = [n for n, t in vectors.pretrained.items() if t.is_floating_point() and n not in merged]
    config = mergekit_config(method, hparams, pretrained=pool.pretrained_source, finetuned=pool.finetuned_sources,
                             merged_names=vectors.names, kept_names=kept, coefficient_rows=rows)
    assert not isinstance(config, str), config
    return mergekit_yaml(*config, method=method)


STATIC = [
    ("task_arithmetic", {"scaling_coefficient": [0.3, 0.7]}),
    ("weight_average", {}),
    ("ties", {"top_k": 0.25, "scaling_coefficient": 0.8, "scope": "tensor"}),
    ("breadcrumbs", {"top_beta": 0.125, "bottom_gamma": 0.5, "scaling_coefficient": 0.6}),
]


@pytest.mark.parametrize("method,hparams", STATIC, ids=[m for m, _ in STATIC])
def test_static_merges_replay_in_mergekit(zoo, tmp_path, method, hparams):
    pool = _pool(zoo)
    vectors = pool.task_vectors()
    spec = get_method(method)
    ours = vectors.state_dict_from_deltas(spec.fn(vectors, **spec.resolve_hparams(hparams)))
    theirs = _mergekit_tensors(_yaml(pool, vectors, method, spec.resolve_hparams(hparams)), tmp_path / "out")
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_learned_layer_wise_coefficients_are_per_tensor_weights(zoo, tmp_path):
    """Random per-tensor coefficients, with the norms kept at θ0 (modelpool.include): weight 0 in mergekit."""
    pool = _pool(zoo, include=["*proj.weight", "*embed_tokens.weight", "lm_head.weight"])
    vectors = pool.task_vectors()
    merged = MergedModel(pool.fresh_backbone(), vectors, granularity="layer_wise")
    with torch.no_grad():
        merged.coefficients.uniform_(0.0, 1.0)
    ours = merged.merge_and_unload().state_dict()
    text = _yaml(pool, vectors, "adamerging_layer_wise", {"base": None},
                 rows=merged.coefficient_rows().detach().tolist())
    assert "filter: model.layers.1.mlp.down_proj.weight" in text and "- value: 0.0" in text
    theirs = _mergekit_tensors(text, tmp_path / "out")
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(theirs["model.norm.weight"], vectors.pretrained["model.norm.weight"])


def test_dare_replays_with_mergekit_s_own_masks(zoo, tmp_path):
    """mergekit draws its own masks: every entry must be θ0 + Σ over a subset of tasks of λ_k τ_k / (1 − p), and
    about (1 − p)² of the entries keep both tasks."""
    pool = _pool(zoo)
    vectors = pool.task_vectors()
    hparams = get_method("dare").resolve_hparams({"drop_rate": 0.5, "scaling_coefficient": [0.4, 0.9]})
    theirs = _mergekit_tensors(_yaml(pool, vectors, "dare", hparams), tmp_path / "out")
    both = total = 0
    for name, stacked in vectors.vectors.items():
        parts = [w / 0.5 * stacked[k] for k, w in enumerate(hparams["scaling_coefficient"])]
        options = torch.stack([torch.zeros_like(parts[0]), parts[0], parts[1], parts[0] + parts[1]])
        delta = theirs[name] - vectors.pretrained[name]
        error = (options - delta).abs().min(dim=0).values
        assert error.max() < 1e-5, name
        both += int(((options[3] - delta).abs() < 1e-6).sum())
        total += delta.numel()
    assert abs(both / total - 0.25) < 0.02


def test_merges_mergekit_cannot_express_say_why(zoo):
    pool = _pool(zoo)
    common = {"pretrained": pool.pretrained_source, "finetuned": pool.finetuned_sources, "merged_names": ["w"]}
    ties = get_method("ties").resolve_hparams({"scope": "model"})
    assert "scope=model" in mergekit_config("ties", ties, **common)
    assert "no mergekit counterpart" in mergekit_config("tsv_merge", {}, **common)
    assert "not task arithmetic" in mergekit_config("adamerging_layer_wise", {"base": "ties"}, coefficient_rows=[[1, 1]],
                                                    **common)
    in_memory = {**common, "finetuned": {"alpha": {"w": torch.zeros(1)}}}
    assert "model directories or hub ids" in mergekit_config("task_arithmetic", {"scaling_coefficient": 0.3}, **in_memory)
