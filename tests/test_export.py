import datetime
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from adamerge.export import writer as export
from adamerge.export.writer import MERGE_CONFIG, WEIGHTS, ExportError, export_merged
from adamerge.export.loading import TRUSTED_ARCHITECTURES, load_backbone, load_merged, read_merge_config
from adamerge.methods.learned.merged import MergedModel
from adamerge.pool.task_vectors import TaskVectors
from tests.helpers import TinyConvNet, finetuned_states

ARCH = {"_target_": "tests.helpers.TinyConvNet", "features": 5}
TRUST = ["tests.helpers.TinyConvNet"]  # not one of adamerge's own architectures: the tests trust it explicitly


def trained_net(features=5):
    net = TinyConvNet(features)
    with torch.no_grad():  # non-default statistics and buffers, so a reload from defaults would differ
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.num_batches_tracked.fill_(7)
        net.position_ids.add_(10)
    return net.eval()


def siblings(directory):
    return sorted(p.name for p in directory.parent.iterdir() if p.name != directory.name)


def test_plain_module_round_trip_and_merge_config(tmp_path):
    net = trained_net()
    config = {
        "method": "adamerging",
        "hyperparameters": {"lr": 1e-3, "steps": np.int64(500)},
        "coefficients": torch.tensor([[0.25, 0.5], [0.75, float("nan")]]),
        "mask": {"sparsity": np.float32(0.5)},
        "sources": [{"path": tmp_path / "a.pt", "sha256": "ab" * 32}],
    }
    # The stamp is the export's own UTC time (whole seconds), so it lies between these two readings.
    utc = datetime.timezone.utc
    before = datetime.datetime.now(utc).replace(microsecond=0)
    out = export_merged(net, tmp_path / "merged", merge_config=config, architecture=ARCH)
    after = datetime.datetime.now(utc)
    assert out == tmp_path / "merged"
    # No heads were given; the model card and the heatmap of the recorded coefficients are always written.
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "coefficients.png", MERGE_CONFIG, WEIGHTS]
    assert siblings(out) == []
    with pytest.raises(ExportError, match=r"holds no task heads.*load_backbone"):
        load_merged(out, trust=TRUST)

    loaded = load_backbone(out, trust=TRUST)
    assert isinstance(loaded, TinyConvNet) and not loaded.training
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(loaded(x), net(x))
    assert torch.equal(loaded.position_ids, net.position_ids)
    assert int(loaded.bn.num_batches_tracked) == 7

    with safe_open(out / WEIGHTS, "pt") as f:  # a real safetensors file, int buffer kept as int
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(net.state_dict())
        assert f.get_tensor("position_ids").dtype == torch.int64

    text = (out / MERGE_CONFIG).read_text()
    assert "NaN" not in text
    written = json.loads(text)
    assert written == read_merge_config(out) == read_merge_config(out / MERGE_CONFIG)
    assert written["method"] == "adamerging"
    assert written["hyperparameters"] == {"lr": 1e-3, "steps": 500}
    assert written["coefficients"] == [[0.25, 0.5], [0.75, None]]
    assert written["mask"] == {"sparsity": 0.5}
    assert written["sources"][0]["path"] == str(tmp_path / "a.pt")
    assert written["architecture"] == ARCH
    created = datetime.datetime.fromisoformat(written["created"])
    assert created.tzinfo is not None and created.utcoffset() == after.utcoffset()
    assert before <= created <= after
    versions = written["versions"]
    assert set(versions) == {"python", "torch", "transformers", "lightning", "safetensors", "adamerge"}
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__


def test_unrebuildable_architecture_needs_model_argument(tmp_path):
    net = trained_net(features=3)
    out = export_merged(net, tmp_path / "m", merge_config={"method": "ties"})
    arch = read_merge_config(out)["architecture"]
    assert arch == {"class": "tests.helpers.TinyConvNet", "rebuildable": False}
    with pytest.raises(ExportError, match=r"model=") as info:
        load_backbone(out)
    assert str(out) in str(info.value)

    loaded = load_backbone(out, TinyConvNet(3))
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(loaded(x), net(x)) and not loaded.training


def test_tied_plain_module(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    model = Tied()
    out = export_merged(model, tmp_path / "tied", merge_config={"method": "m"})
    fresh = Tied()
    loaded = load_backbone(out, fresh)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.head.weight is loaded.embed.weight


def _tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    return BertModel(config).eval()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)).eval()


def test_transformers_bert_round_trip(tmp_path):
    model = _tiny_bert()
    out = export_merged(model, tmp_path / "bert", merge_config={"method": "task_arithmetic"}, architecture={"note": 1})
    assert (out / "config.json").is_file() and (out / WEIGHTS).is_file()
    arch = read_merge_config(out)["architecture"]
    assert arch["transformers_class"] == "BertModel"
    loaded = load_backbone(out)
    assert type(loaded).__name__ == "BertModel" and not loaded.training
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_transformers_tied_gpt2_round_trip(tmp_path):
    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    out = export_merged(model, tmp_path / "gpt2", merge_config={"method": "adamerging"})
    assert (out / "config.json").is_file()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        loaded = load_backbone(out)
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert torch.equal(loaded(ids).logits, expected)
        # The same file also loads into a module built in memory (safetensors resolves the tied alias).
        into = load_backbone(out, type(model)(model.config))
        assert torch.equal(into(ids).logits, expected)


def test_sharded_transformers_weights_load(tmp_path):
    model = _tiny_gpt2()
    out = export_merged(model, tmp_path / "gpt2", merge_config={"method": "adamerging"})
    (out / WEIGHTS).unlink()
    model.save_pretrained(out, max_shard_size="20KB")  # the layout save_pretrained uses above 50GB
    assert (out / "model.safetensors.index.json").is_file() and not (out / WEIGHTS).exists()
    ids = torch.randint(0, 50, (1, 5))
    # The files were rewritten by hand after the export, so their recorded checksums no longer hold.
    with pytest.raises(ExportError, match="is missing"):
        load_backbone(out)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(load_backbone(out, verify=False)(ids).logits, expected)
        assert torch.equal(load_backbone(out, type(model)(model.config), verify=False)(ids).logits, expected)
        with pytest.raises(ExportError, match="do not fit"):
            load_backbone(out, nn.Linear(2, 2), verify=False)


def test_end_to_end_through_merged_model(tmp_path):
    module = trained_net(features=6)
    pretrained = {k: v.clone() for k, v in module.state_dict().items()}
    vectors = TaskVectors.from_state_dicts(pretrained, finetuned_states(module, 3))
    merged = MergedModel(module, vectors, granularity="layer_wise").eval()
    with torch.no_grad():
        merged.coefficients.copy_(torch.rand_like(merged.coefficients))
    fused = merged.merge_and_unload()

    with pytest.raises(ExportError, match="merge_and_unload"):
        export_merged(merged, tmp_path / "wrapper", merge_config={})
    out = export_merged(
        fused,
        tmp_path / "fused",
        merge_config={"method": "adamerging", "coefficients": merged.coefficients},
        architecture={"_target_": "tests.helpers.TinyConvNet", "features": 6},
    )
    assert read_merge_config(out)["coefficients"] == merged.coefficients_as_list()
    loaded = load_backbone(out, trust=TRUST)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), merged(x), atol=1e-6, rtol=0)


def test_extra_files(tmp_path):
    heatmap = tmp_path / "heatmap.png"
    heatmap.write_bytes(b"\x89PNG fake")
    tokenizer = tmp_path / "tok"
    (tokenizer / "sub").mkdir(parents=True)
    (tokenizer / "vocab.txt").write_text("a\nb\n")
    (tokenizer / "sub" / "x.json").write_text("{}")
    out = export_merged(
        trained_net(),
        tmp_path / "m",
        merge_config={},
        architecture=ARCH,
        extra_files={"plots/heatmap.png": heatmap, "mask_logits.bin": b"\x00\x01", "tokenizer": tokenizer, ".": tokenizer},
    )
    assert (out / "plots" / "heatmap.png").read_bytes() == b"\x89PNG fake"
    assert (out / "mask_logits.bin").read_bytes() == b"\x00\x01"
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert (out / "tokenizer" / "sub" / "x.json").is_file()
    assert (out / "vocab.txt").is_file()  # "." copies a directory's contents into the export root

    for bad in ({MERGE_CONFIG: b"x"}, {WEIGHTS: b"x"}, {"../escape": b"x"}, {"missing": tmp_path / "nope"}):
        with pytest.raises(ExportError):
            export_merged(trained_net(), tmp_path / "bad", merge_config={}, architecture=ARCH, extra_files=bad)
        assert not (tmp_path / "bad").exists()
    # A collision discovered while copying still leaves nothing behind.
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / MERGE_CONFIG).write_bytes(b"x")
    with pytest.raises(ExportError, match="collides"):
        export_merged(trained_net(), tmp_path / "bad", merge_config={}, architecture=ARCH, extra_files={".": clash})
    assert not (tmp_path / "bad").exists() and not any(p.name.startswith(".bad") for p in tmp_path.iterdir())


def test_existing_export_is_not_overwritten_by_default(tmp_path):
    first = export_merged(trained_net(), tmp_path / "m", merge_config={"method": "first"}, architecture=ARCH)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(ExportError, match=r"overwrite=True") as info:
        export_merged(trained_net(), first, merge_config={"method": "second"}, architecture=ARCH)
    assert str(first) in str(info.value)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_overwrite_replaces_contents(tmp_path):
    first = export_merged(trained_net(), tmp_path / "m", merge_config={"method": "first"}, extra_files={"old.txt": b"1"})
    net = trained_net()
    export_merged(net, first, merge_config={"method": "second"}, architecture=ARCH, overwrite=True)
    assert read_merge_config(first)["method"] == "second"
    assert not (first / "old.txt").exists()
    assert siblings(first) == []
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(load_backbone(first, trust=TRUST)(x), net(x))


def test_overwrite_refuses_a_directory_that_is_not_an_export(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("!")
    with pytest.raises(ExportError, match="not an export"):
        export_merged(trained_net(), precious, merge_config={}, architecture=ARCH, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "!"


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    target = tmp_path / "m"
    if existing:
        export_merged(trained_net(), target, merge_config={"method": "old"}, architecture=ARCH)
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(path, content):
        assert (path.parent / WEIGHTS).is_file()  # really mid-write: the weights are already there
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        export_merged(trained_net(), target, merge_config={"method": "new"}, architecture=ARCH, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if existing:
        assert read_merge_config(target)["method"] == "old"


def test_failed_rename_restores_the_old_export(tmp_path, monkeypatch):
    target = export_merged(trained_net(), tmp_path / "m", merge_config={"method": "old"}, architecture=ARCH)
    real_replace = export.os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        export_merged(trained_net(), target, merge_config={"method": "new"}, architecture=ARCH, overwrite=True)
    assert read_merge_config(target)["method"] == "old"
    assert siblings(target) == []


def test_bad_arguments_fail_before_writing(tmp_path):
    with pytest.raises(ExportError, match="_target_"):
        export_merged(trained_net(), tmp_path / "a", merge_config={}, architecture={"features": 5})
    with pytest.raises(ExportError, match=r"merge_config\.obj"):
        export_merged(trained_net(), tmp_path / "a", merge_config={"obj": object()}, architecture=ARCH)
    assert list(tmp_path.iterdir()) == []


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ExportError, match="does not exist") as info:
        load_backbone(missing)
    assert str(missing) in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match=MERGE_CONFIG) as info:
        load_backbone(empty)
    assert str(empty) in str(info.value)

    out = export_merged(trained_net(), tmp_path / "m", merge_config={}, architecture=ARCH)
    (out / WEIGHTS).unlink()
    with pytest.raises(ExportError, match="no weights") as info:
        load_backbone(out)
    assert str(out) in str(info.value)

    out = export_merged(trained_net(), tmp_path / "wrong", merge_config={}, architecture=ARCH)
    with pytest.raises(ExportError, match="do not fit") as info:
        load_backbone(out, nn.Linear(2, 2))
    assert str(out) in str(info.value)

    (out / MERGE_CONFIG).write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        read_merge_config(out)

    bad_target = export_merged(
        trained_net(), tmp_path / "target", merge_config={}, architecture={"_target_": "nowhere.Nothing"}
    )
    with pytest.raises(ExportError, match="refusing to build architecture 'nowhere.Nothing'") as info:
        load_backbone(bad_target)
    assert str(bad_target) in str(info.value)


def test_strict_json_never_writes_nan(tmp_path):
    out = export_merged(
        trained_net(), tmp_path / "m", merge_config={"loss": math.inf, "x": np.array([np.nan, 1.0])}, architecture=ARCH
    )
    assert json.loads((out / MERGE_CONFIG).read_text(), parse_constant=pytest.fail)["x"] == [None, 1.0]


# --- loading is safe: verified bytes, no code chosen by the export -------------------------------------------


def test_export_records_the_sha256_of_every_file(tmp_path):
    import hashlib

    out = export_merged(trained_net(), tmp_path / "m", merge_config={}, architecture=ARCH,
                        extra_files={"notes/readme.txt": b"hello"})
    files = read_merge_config(out)["files"]
    assert set(files) == {WEIGHTS, "notes/readme.txt", "README.md"}
    for name, digest in files.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove_extra"])
def test_tampered_or_truncated_export_is_refused(tmp_path, damage):
    out = export_merged(trained_net(), tmp_path / "m", merge_config={}, architecture=ARCH,
                        extra_files={"tokenizer.json": b"{}"})
    weights = out / WEIGHTS
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # one bit of the last weight: still a valid safetensors file
        weights.write_bytes(bytes(data))
        match = f"{WEIGHTS} does not match the sha256"
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) - 4096]))
        match = f"{WEIGHTS} does not match the sha256"
    else:
        (out / "tokenizer.json").unlink()
        match = "tokenizer.json is missing"
    with pytest.raises(ExportError, match=match) as info:
        load_backbone(out, trust=TRUST)
    assert str(out) in str(info.value) and (damage == "remove_extra" or "verify=False" in str(info.value))
    if damage == "flip":  # the explicit opt-out loads the (modified) bytes
        assert isinstance(load_backbone(out, trust=TRUST, verify=False), TinyConvNet)


def test_edited_checksum_is_refused(tmp_path):
    out = export_merged(trained_net(), tmp_path / "m", merge_config={}, architecture=ARCH)
    config = json.loads((out / MERGE_CONFIG).read_text())
    config["files"][WEIGHTS] = "0" * 64
    (out / MERGE_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ExportError, match="does not match the sha256"):
        load_backbone(out, trust=TRUST)
    del config["files"]
    (out / MERGE_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ExportError, match="records no file checksums"):
        load_backbone(out, trust=TRUST)


def _pickle_that_writes(marker):
    import io
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buffer = io.BytesIO()
    pickle.dump(Payload(), buffer)
    return list(buffer.getvalue())


@pytest.mark.parametrize("where", ["target", "nested", "hydra_key"])
def test_an_export_never_chooses_code_to_run(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = {"_target_": "torch.load", "weights_only": False, "f": {"_target_": "io.BytesIO",
               "initial_bytes": _pickle_that_writes(marker)}}
    out = export_merged(trained_net(), tmp_path / "m", merge_config={}, architecture=ARCH)
    config = json.loads((out / MERGE_CONFIG).read_text())
    trusted = sorted(TRUSTED_ARCHITECTURES)[0]
    if where == "target":
        config["architecture"] = payload
        match = "refusing to build architecture 'torch.load'"
    elif where == "nested":
        config["architecture"] = {"_target_": trusted, "num_classes": payload}
        match = r"architecture\.num_classes\._target_.* would name code to run"
    else:
        config["architecture"] = {"_target_": trusted, "_args_": [payload]}
        match = r"architecture\._args_.* would name code to run"
    (out / MERGE_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ExportError, match=match):
        load_backbone(out)
    with pytest.raises(ExportError):
        load_backbone(out, trust=["torch.load"], verify=False) if where == "target" else load_backbone(out)
    assert not marker.exists()


def test_own_architectures_rebuild_without_trust(tmp_path):
    from adamerge.backbones.efficientnet import EfficientNetLite0

    net = EfficientNetLite0(num_classes=None).eval()
    out = export_merged(net, tmp_path / "e", merge_config={},
                        architecture={"_target_": "adamerge.backbones.efficientnet.EfficientNetLite0", "num_classes": None})
    loaded = load_backbone(out)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_an_export_written_before_0_3_loads_by_its_recorded_old_class_path(tmp_path):
    """0.2 recorded the backbone as ``adamerge.models.efficientnet.EfficientNetLite0``; the loader maps it to its new
    module (adamerge.storage.renamed) rather than refusing an export it wrote itself."""
    from adamerge.backbones.efficientnet import EfficientNetLite0

    net = EfficientNetLite0(num_classes=None).eval()
    out = export_merged(net, tmp_path / "e", merge_config={},
                        architecture={"_target_": "adamerge.backbones.efficientnet.EfficientNetLite0", "num_classes": None})
    config = json.loads((out / MERGE_CONFIG).read_text())
    config["architecture"]["_target_"] = "adamerge.models.efficientnet.EfficientNetLite0"
    (out / MERGE_CONFIG).write_text(json.dumps(config))
    assert read_merge_config(out)["architecture"]["_target_"] == "adamerge.models.efficientnet.EfficientNetLite0"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_backbone(out)(x), net(x))
    config["architecture"]["_target_"] = "adamerge.models.efficientnet.Elsewhere"  # an old path that never existed
    (out / MERGE_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ExportError, match="refusing to build architecture 'adamerge.models.efficientnet.Elsewhere'"):
        load_backbone(out)
