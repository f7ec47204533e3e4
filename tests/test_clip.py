"""CLIP image classification path, offline: tiny random CLIP models saved with save_pretrained."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers

from adamerge import load_merged
from adamerge.pool.checkpoints import CheckpointError
from adamerge.backbones import clip as clip_module
from adamerge.backbones.clip import (
    CLIP_EIGHT_TASKS,
    ZeroShotHead,
    clip_task,
    clip_vision_model,
    zero_shot_head,
)
from adamerge.backbones.hf_checkpoints import HFModelPool, align_state_dict
from tests.helpers import char_tokenizer

TASKS = ("eurosat", "mnist")  # real class names and templates from the shipped resources
IMAGE_SIZE = 30


def tiny_clip_config(tokenizer) -> transformers.CLIPConfig:
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=80, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=10)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def clip_zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP 'hub': pretrained CLIPModel dir (+ tokenizer + processor), fine-tuned vision towers, data."""
    root = tmp_path_factory.mktemp("clip_zoo")
    torch.manual_seed(0)
    pretrained = root / "clip-tiny"
    tokenizer = char_tokenizer(pretrained)
    model = transformers.CLIPModel(tiny_clip_config(tokenizer)).eval()
    model.save_pretrained(pretrained)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(pretrained)
    paths = {"pretrained": pretrained}
    for k, task in enumerate(TASKS):
        vision = transformers.CLIPVisionModel.from_pretrained(pretrained)
        perturbed(vision, 0.02, seed=k + 1).save_pretrained(root / f"clip-tiny_{task}")  # like tanganke/<...>_<task>
        paths[task] = root / f"clip-tiny_{task}"
        rng = np.random.default_rng(k)
        n = 24
        images = [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(n)]
        classes = len(clip_task(task)[0])
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)})
        ds = datasets.Dataset.from_dict({"image": images, "label": rng.integers(0, classes, n).tolist()}, features=features)
        datasets.DatasetDict({"test": ds}).save_to_disk(root / "data" / task)
        paths[f"data_{task}"] = root / "data" / task
    return paths


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMERGE_CACHE_DIR", str(tmp_path / "cache"))
    clip_module.clear_model_cache()
    yield
    clip_module.clear_model_cache()


def test_shipped_class_names_and_templates():
    sizes = {"sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
             "mnist": 10, "dtd": 47}
    for task in CLIP_EIGHT_TASKS:
        names, templates = clip_task(task)
        assert len(names) == sizes[task] and len(set(names)) == len(names)
        assert templates and all("{}" in t for t in templates)
    assert clip_task("eurosat")[1][0] == "a centered satellite photo of {}."
    with pytest.raises(KeyError, match="no class names shipped"):
        clip_task("imagenet-9000")


def test_zero_shot_head_reproduces_clip_logits(clip_zoo):
    """backbone (vision tower) + head == CLIPModel's own logits_per_image for one template."""
    names = ["cat", "dog", "a red car"]
    head = zero_shot_head(clip_zoo["pretrained"], classnames=names, templates=["a photo of a {}."])
    backbone = clip_vision_model(clip_zoo["pretrained"])
    clip = transformers.CLIPModel.from_pretrained(clip_zoo["pretrained"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip_zoo["pretrained"])
    pixels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    tokens = tokenizer([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        pixel_values=pixels).logits_per_image
        got = head(backbone(pixels))
    assert isinstance(head, ZeroShotHead) and head.num_classes == 3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_zero_shot_head_averages_templates_and_is_cached(clip_zoo, monkeypatch):
    head = zero_shot_head(clip_zoo["pretrained"], "eurosat")
    cached = list((Path(os.environ["ADAMERGE_CACHE_DIR"]) / "zero_shot_heads").glob("*.safetensors"))
    assert len(cached) == 1
    assert head.text_embeddings.shape == (10, 16)
    torch.testing.assert_close(head.text_embeddings.norm(dim=-1), torch.ones(10))

    def no_model(*args, **kwargs):
        raise AssertionError("the cached head must not load the CLIP model again")

    monkeypatch.setattr(clip_module, "zero_shot_weights", no_model)
    again = zero_shot_head(clip_zoo["pretrained"], "eurosat")
    torch.testing.assert_close(again.text_embeddings, head.text_embeddings)
    with pytest.raises(AssertionError, match="must not load"):  # other class names: another cache key
        zero_shot_head(clip_zoo["pretrained"], classnames=["x", "y"], templates=["{}"])


def test_a_damaged_cached_head_is_recomputed_never_used(clip_zoo, monkeypatch):
    """Bytes changed inside a cached head (its safetensors header intact), or its recorded hash gone: recomputed."""
    head = zero_shot_head(clip_zoo["pretrained"], "mnist")
    names, templates = clip_module.clip_task("mnist")
    key = clip_module.head_cache_key(clip_zoo["pretrained"], names, templates, None)
    entry = Path(os.environ["ADAMERGE_CACHE_DIR"]) / "zero_shot_heads" / f"{key}.safetensors"
    assert entry.is_file() and entry.with_name(entry.name + ".sha256").is_file()
    calls = []
    real = clip_module.zero_shot_weights
    monkeypatch.setattr(clip_module, "zero_shot_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = bytearray(entry.read_bytes())
    data[-64:] = bytes(64)  # the tensors' last bytes, header untouched: safetensors would load it
    entry.write_bytes(bytes(data))
    again = zero_shot_head(clip_zoo["pretrained"], "mnist")
    assert calls == [1]
    torch.testing.assert_close(again.text_embeddings, head.text_embeddings)
    entry.with_name(entry.name + ".sha256").unlink()
    zero_shot_head(clip_zoo["pretrained"], "mnist")
    assert calls == [1, 1]


def test_checkpoint_keys_of_all_clip_layouts_line_up(clip_zoo, tmp_path):
    """5.x CLIPVisionModel files, 4.x 'vision_model.'-prefixed files and full CLIPModel files all align."""
    from safetensors.torch import load_file, save_file

    backbone = clip_vision_model(clip_zoo["pretrained"])
    expected = list(backbone.state_dict())
    modern = load_file(str(clip_zoo["eurosat"] / "model.safetensors"))
    legacy_dir = tmp_path / "legacy"  # what transformers 4.x wrote (and what the hub checkpoints hold)
    legacy_dir.mkdir()
    save_file({f"vision_model.{k}": v for k, v in modern.items()}, str(legacy_dir / "model.safetensors"))
    full = load_file(str(clip_zoo["pretrained"] / "model.safetensors"))
    for state in (modern, {f"vision_model.{k}": v for k, v in modern.items()}, full):
        aligned = align_state_dict(state, expected, source="x")
        assert set(aligned) == set(expected)
    pool = HFModelPool(backbone=backbone, finetuned={"eurosat": legacy_dir / "model.safetensors"},
                       heads={"eurosat": torch.nn.Identity()}, pretrained=str(clip_zoo["pretrained"]))
    vectors = pool.task_vectors()
    assert vectors.names and all(v.abs().max() > 0 for v in vectors.vectors.values() if v.numel() > 1)

    text_only = {k: v for k, v in full.items() if k.startswith("text_model.")}
    with pytest.raises(CheckpointError, match="does not fit the backbone|does not contain every tensor"):
        align_state_dict(text_only, expected, source="text-tower.safetensors")
    half = dict(list(modern.items())[: len(modern) // 2])
    with pytest.raises(CheckpointError, match=r"half\.safetensors.*lacks"):
        align_state_dict(half, expected, source="half.safetensors")


def test_unreachable_hub_id_names_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="adamerge-test/no-such-clip"):
        clip_vision_model("adamerge-test/no-such-clip")
    with pytest.raises(CheckpointError, match="adamerge-test/no-such-clip"):
        zero_shot_head("adamerge-test/no-such-clip", "mnist")


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from adamerge.cli.main import register_resolvers
    from adamerge.methods.configs import CONF_DIR

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_clip_experiment_config_runs_end_to_end(clip_zoo, tmp_path):
    """The shipped experiment file, pointed at the tiny zoo, through the runner (the CLI's code path)."""
    from adamerge.cli.runner import run

    others = [t for t in CLIP_EIGHT_TASKS if t not in TASKS]
    overrides = [
        "experiment=clip_vit_b32_8tasks",
        f"modelpool.pretrained={clip_zoo['pretrained']}",
        "trainer=cpu", "trainer.max_steps=3", "trainer.enable_progress_bar=false", "logger=none",
        "data.batch_size=4", "data.num_workers=0", "data.eval_batch_size=16",
        # two of the eight tasks, pointed at the tiny zoo; their heads stay as the experiment configures them
        *[f"~{node}.{t}" for t in others for node in ("modelpool.finetuned", "modelpool.heads", "data.tasks")],
        *[f"modelpool.finetuned.{t}={clip_zoo[t]}" for t in TASKS],
        *[f"data.tasks.{t}.path={clip_zoo['data_' + t]}" for t in TASKS],
    ]
    cfg = _compose(overrides)
    assert cfg.trainer.max_steps == 3 and cfg.method.name == "adamerging_layer_wise"
    assert list(cfg.modelpool.heads) == list(TASKS) and cfg.modelpool.heads.mnist.task == "mnist"
    (tmp_path / "run").mkdir()  # Hydra creates the run dir before the CLI calls run()
    result = run(cfg, tmp_path / "run")
    row = result["rows"][0]
    assert set(row["accuracy"]) == set(TASKS)
    assert len(row["entropy_history"]) == 3
    exported = Path(row["export"])
    merged = transformers.CLIPVisionModel.from_pretrained(exported)  # a plain HF vision tower
    assert merged.config.image_size == IMAGE_SIZE
    config = json.loads((exported / "merge_config.json").read_text())
    assert config["method"] == "adamerging_layer_wise"

    # The zero-shot heads travel as text embeddings + the class names and templates that made them.
    model = load_merged(exported)
    assert model.tasks == list(TASKS)
    for task in TASKS:
        names, templates = clip_task(task)
        assert model.class_names(task) == names and config["heads"][task]["templates"] == templates
        head = zero_shot_head(clip_zoo["pretrained"], task)  # the run's head, from the (isolated) head cache
        assert torch.equal(model.heads[task].text_embeddings, head.text_embeddings)
        # Per-task zero-shot predictions: the run's own computation, and its accuracy on the task's test split.
        test = datasets.load_from_disk(str(clip_zoo[f"data_{task}"]))["test"]
        pixels = model.preprocess(list(test["image"]), task=task)
        with torch.no_grad():
            assert torch.equal(model(pixels, task=task), head(merged(pixels)))
        predicted = model.predict(list(test["image"]), task=task, batch_size=16)  # data.eval_batch_size=16
        correct = sum(names.index(p) == y for p, y in zip(predicted, test["label"]))
        assert correct / len(test) == row["accuracy"][task]
    card = (exported / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "(coefficients.png)" in card
