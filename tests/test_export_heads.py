"""Heads travel with the export; load_merged gives the multi-task model (or one task's); the model card."""

from __future__ import annotations

import hashlib
import json
import os
import re

import datasets
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adamerge import load_backbone, load_merged
from adamerge.export import heads as export_heads
from adamerge.export.writer import MERGE_CONFIG, ExportError, export_merged
from adamerge.export.loading import read_merge_config
from adamerge.backbones.clip import ZeroShotHead
from adamerge.export.multitask import MultiTaskModel, TaskModel
from adamerge.data.preprocessing import ImagePreprocessor
from tests.helpers import ScaledHead, TinyConvNet

ARCH = {"_target_": "tests.helpers.TinyConvNet", "features": 5}
TRUST = ["tests.helpers.TinyConvNet"]
SHAPES = ["circle", "square", "star"]


def pool_like(seed: int = 0) -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(seed)
    return TinyConvNet(5).eval(), {"shapes": nn.Linear(5, 3), "colours": nn.Linear(5, 2)}


def export_pool(tmp_path, name="m", heads=None, **kwargs):
    net, own = pool_like()
    heads = own if heads is None else heads
    config = {"method": "adamerging_layer_wise", "tasks": list(heads), "coefficients": [[0.3, 0.7]] * 4,
              "accuracy": {t: 0.5 for t in heads}, "hyperparameters": {"lr": 0.01}}
    kwargs.setdefault("class_names", {"shapes": SHAPES} if "shapes" in heads else None)
    kwargs.setdefault("preprocessors", {t: ImagePreprocessor(8) for t in heads})
    out = export_merged(net, tmp_path / name, merge_config=config, architecture=ARCH, heads=heads, **kwargs)
    return out, net, heads


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (11, 9, 3), dtype=np.uint8) for _ in range(n)]


def test_heads_are_in_the_export_with_class_names_and_hashes(tmp_path):
    out, _, heads = export_pool(tmp_path)
    config = read_merge_config(out)
    assert list(config["heads"]) == ["shapes", "colours"]
    for task, record in config["heads"].items():
        file = out / record["file"]
        assert record["file"] == f"heads/{task}.safetensors" and record["kind"] == "linear"
        assert record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest() == config["files"][record["file"]]
        with safe_open(file, "pt") as f:
            assert f.metadata()["adamerge_head"] == "linear" and f.metadata()["task"] == task
            assert torch.equal(f.get_tensor("weight"), heads[task].weight.detach())
        assert record["inputs"]["kind"] == "image" and record["inputs"]["image_size"] == 8
    assert config["heads"]["shapes"]["class_names"] == SHAPES and config["heads"]["shapes"]["num_classes"] == 3
    assert config["heads"]["colours"]["class_names"] is None


def test_load_merged_is_the_multi_task_model(tmp_path):
    out, net, heads = export_pool(tmp_path)
    model = load_merged(out, trust=TRUST)
    assert isinstance(model, MultiTaskModel) and not model.training
    assert model.tasks == ["shapes", "colours"]
    assert model.class_names("shapes") == SHAPES and model.class_names("colours") is None
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for task, head in heads.items():
            assert torch.equal(model(x, task=task), head(net(x)))
        assert torch.equal(model.backbone(x), load_backbone(out, trust=TRUST)(x))
    # Raw images go through the recorded preprocessing; names where known, indices where not.
    raw = images(5)
    expected = model(ImagePreprocessor(8)({"image": raw})["inputs"], task="shapes").argmax(-1).tolist()
    assert model.predict(raw, task="shapes") == [SHAPES[i] for i in expected]
    assert model.predict(raw, task="shapes", batch_size=2) == [SHAPES[i] for i in expected]
    assert model.predict(raw[0], task="shapes") == [SHAPES[expected[0]]]
    assert model.predict(np.stack(raw), task="shapes") == [SHAPES[i] for i in expected]  # an N×H×W×C batch
    column = datasets.Dataset.from_dict({"image": raw}).with_format("numpy")["image"]  # a datasets column
    assert model.predict(column, task="shapes") == [SHAPES[i] for i in expected]
    assert model.predict(x, task="colours") == model(x, task="colours").argmax(-1).tolist()
    with pytest.raises(KeyError, match=r"\['shapes', 'colours'\]"):
        model(x)
    with pytest.raises(KeyError, match="'sizes'"):
        model.predict(raw, task="sizes")


def test_load_merged_one_task_is_a_plain_module(tmp_path):
    out, net, heads = export_pool(tmp_path)
    single = load_merged(out, task="colours", trust=TRUST)
    assert isinstance(single, TaskModel) and not isinstance(single, MultiTaskModel) and not single.training
    assert single.task == "colours" and single.class_names is None
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(single(x), heads["colours"](net(x)))
    assert single.predict(images(2)) == single(ImagePreprocessor(8)({"image": images(2)})["inputs"]).argmax(-1).tolist()
    assert set(dict(single.named_children())) == {"backbone", "head"}
    with pytest.raises(ExportError, match=r"no task 'sizes'.*\['shapes', 'colours'\]"):
        load_merged(out, task="sizes", trust=TRUST)


@pytest.mark.parametrize("damage", ["missing", "missing_unverified", "flipped", "truncated", "foreign"])
def test_missing_or_corrupt_head_file_names_the_file(tmp_path, damage):
    out, _, _ = export_pool(tmp_path)
    file = out / "heads" / "colours.safetensors"
    verify = damage in ("missing", "flipped")
    if damage.startswith("missing"):
        file.unlink()
        match = r"heads/colours\.safetensors.* is missing" if verify else r"head file .*heads/colours\.safetensors of task 'colours' is missing"
    elif damage == "flipped":
        data = bytearray(file.read_bytes())
        data[-2] ^= 1
        file.write_bytes(bytes(data))
        match = r"heads/colours\.safetensors does not match the sha256"
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:40])
        match = r"head file .*heads/colours\.safetensors of task 'colours' is not a readable safetensors file"
    else:
        save_file({"kernel": torch.zeros(2, 5)}, str(file))
        match = r"head file .*heads/colours\.safetensors of task 'colours' lacks \['weight'\]"
    with pytest.raises(ExportError, match=match):
        load_merged(out, trust=TRUST, verify=verify)
    # The one-task load of another task does not read the damaged file.
    assert load_merged(out, task="shapes", trust=TRUST, verify=False).task == "shapes"


def test_heads_an_export_cannot_rebuild_need_the_module_or_trust(tmp_path):
    custom = ScaledHead(5, 3)
    out, net, _ = export_pool(tmp_path, heads={"scaled": custom, "plain": nn.Identity()}, class_names=None)
    record = read_merge_config(out)["heads"]["scaled"]
    assert record["kind"] == "module" and record["class"] == "tests.helpers.ScaledHead"
    with pytest.raises(ExportError, match=r"tests\.helpers\.ScaledHead.*heads=\{'scaled'"):
        load_merged(out, trust=TRUST)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        filled = load_merged(out, trust=TRUST, heads={"scaled": ScaledHead(5, 3)})
        assert torch.equal(filled(x, task="scaled"), custom(net(x)))
        trusted = load_merged(out, trust=[*TRUST, "tests.helpers.ScaledHead"])
        assert torch.equal(trusted(x, task="scaled"), custom(net(x)))
        assert torch.equal(trusted(x, task="plain"), net(x))  # nn.Identity is rebuilt without trust
    with pytest.raises(ExportError, match=r"heads= names tasks \['nope'\]"):
        load_merged(out, trust=TRUST, heads={"nope": nn.Identity()})


def test_zero_shot_head_travels_with_its_class_names_and_templates(tmp_path):
    torch.manual_seed(0)
    text = nn.functional.normalize(torch.randn(4, 6), dim=-1)
    head = ZeroShotHead(text, torch.tensor(4.6), torch.randn(6, 5), class_names=["a", "b", "c", "d"],
                        templates=["a photo of a {}.", "a {}."])
    out, net, _ = export_pool(tmp_path, heads={"zs": head}, class_names={"zs": ["w", "x", "y", "z"]})
    record = read_merge_config(out)["heads"]["zs"]
    assert record["kind"] == "clip_zero_shot" and record["templates"] == ["a photo of a {}.", "a {}."]
    assert record["class_names"] == ["a", "b", "c", "d"]  # the head's own names win over the data's
    with safe_open(out / record["file"], "pt") as f:
        assert set(f.keys()) == {"text_embeddings", "logit_scale", "projection"}
    loaded = load_merged(out, trust=TRUST).heads["zs"]
    assert loaded.class_names == head.class_names and loaded.templates == head.templates
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(net(x)), head(net(x)))


@pytest.mark.parametrize("bad", ["class_count", "task_name", "per_task_hf", "reserved_extra", "stray_names"])
def test_bad_heads_fail_before_anything_is_written(tmp_path, bad):
    kwargs, match = {}, None
    if bad == "class_count":
        kwargs, match = {"class_names": {"shapes": ["circle", "square"]}}, "task 'shapes': 2 class names for a head with 3 outputs"
    elif bad == "task_name":
        kwargs, match = {"heads": {"../up": nn.Linear(5, 2)}, "class_names": None}, r"task name '\.\./up' cannot name a head file"
    elif bad == "per_task_hf":
        kwargs, match = {"per_task_hf": True}, "per_task_hf needs a transformers backbone"
    elif bad == "reserved_extra":
        kwargs, match = {"extra_files": {"README.md": b"mine"}}, "would replace the export's own README.md"
    else:
        kwargs, match = {"class_names": {"sizes": ["s"]}}, r"without a head: \['sizes'\]"
    with pytest.raises(ExportError, match=match):
        export_pool(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_heads_leaves_nothing_behind(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_heads, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export_pool(tmp_path)
    assert list(tmp_path.iterdir()) == []


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def test_model_card(tmp_path, monkeypatch, capsys):
    licensed = tmp_path / "licensed"
    licensed.mkdir()
    (licensed / "README.md").write_text("---\nlanguage: en\nlicense: mit\n---\n# a model\n")
    sources = {"pretrained": {"source": str(licensed), "sha256": "ab" * 32},
               "shapes": {"source": "someone/shapes-model", "sha256": None},
               "colours": {"source": str(tmp_path / "colours.safetensors"), "sha256": "cd" * 32}}
    net, heads = pool_like()
    config = {"method": "adamerging_layer_wise", "tasks": list(heads), "coefficients": [[0.3, 0.7]] * 4,
              "accuracy": {"shapes": 0.625, "colours": 0.875}, "hyperparameters": {"lr": 0.01, "init_value": 0.3},
              "sources": sources, "evaluation": {"shapes": {"path": "/data/shapes", "split": "test", "examples": 8}}}
    out = export_merged(net, tmp_path / "merged_model", merge_config=config, architecture=ARCH, heads=heads,
                        class_names={"shapes": SHAPES}, preprocessors={t: ImagePreprocessor(8) for t in heads})
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "mit" and front["base_model"] == ["someone/shapes-model"]
    assert front["base_model_relation"] == "merge" and front["pipeline_tag"] == "image-classification"
    assert {"adamerge", "model-merging", "adamerging_layer_wise"} <= set(front["tags"])
    assert "| shapes | 62.50 | `/data/shapes` (test, 8 examples) |" in card and "| **average** | 75.00 |" in card
    assert "| `init_value` | `0.3` |" in card
    assert "![merge coefficients](coefficients.png)" in card and (out / "coefficients.png").read_bytes()[:4] == b"\x89PNG"
    assert f"`{'ab' * 32}`" in card and read_merge_config(out)["heads"]["shapes"]["sha256"] in card
    assert "from the sources' model cards (pretrained: `mit`)" in card

    # The card's loading code runs as written, from the directory that holds the export.
    (code,) = python_blocks(card)
    assert len(code.strip().splitlines()) == 3
    monkeypatch.chdir(tmp_path)
    exec(code.replace('load_merged("merged_model")', 'load_merged("merged_model", trust=TRUST)'),
         {"images": images(2), "TRUST": TRUST})
    printed = capsys.readouterr().out
    assert re.fullmatch(r"\['(circle|square|star)', '(circle|square|star)'\]\n", printed)

    declared = export_merged(net, tmp_path / "declared", merge_config={**config, "coefficients": None},
                             architecture=ARCH, heads=heads, license="apache-2.0")
    card = (declared / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["license"] == "apache-2.0"
    assert "No learned coefficients" in card and not (declared / "coefficients.png").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    sources["colours"]["source"] = str(tmp_path / "other")
    mixed = export_merged(net, tmp_path / "mixed", merge_config={**config, "sources": sources}, architecture=ARCH)
    card = (mixed / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["license"] == "other"
    assert python_blocks(card) == ['import adamerge\nbackbone = adamerge.load_backbone("mixed")\n']  # no heads given
    assert json.loads((mixed / MERGE_CONFIG).read_text())["files"]["README.md"]
    assert os.path.getsize(mixed / "README.md") > 0
