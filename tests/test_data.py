"""Offline tests for adamerge.data.datamodule: tiny datasets built in tmp_path in every supported format."""

from __future__ import annotations

import itertools
import json
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from adamerge.data.datamodule import MultiTaskDataModule
from adamerge.data.preprocessing import ImagePreprocessor, TextPreprocessor
from adamerge.data.tasks import TaskData, TaskDataError

N = 10  # examples per task


def image_ds(n: int = N, value=None, with_label: bool = True) -> datasets.Dataset:
    imgs = [np.full((6, 5, 3), i * 20 if value is None else value, dtype=np.uint8) for i in range(n)]
    cols = {"image": imgs, "idx": list(range(n))}
    feats = {"image": datasets.Image(), "idx": datasets.Value("int64")}
    if with_label:
        cols["label"], feats["label"] = [i % 3 for i in range(n)], datasets.ClassLabel(names=["a", "b", "c"])
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def idx_preprocessor(batch):  # identifies examples so ordering/coverage can be checked
    return {"inputs": torch.tensor(batch["idx"])}


def stream_indices(dm: MultiTaskDataModule, task: str, steps: int) -> list[int]:
    batches = itertools.islice(iter(dm.train_dataloader()), steps)
    return [i for b in batches for i in b[task]["inputs"].tolist()]


@pytest.fixture
def disk_dir(tmp_path):
    path = tmp_path / "disk"
    image_ds().save_to_disk(str(path))
    return str(path)


@pytest.fixture
def two_tasks(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    image_ds().save_to_disk(str(a))
    datasets.DatasetDict({"test": image_ds(7), "train": image_ds(3)}).save_to_disk(str(b))
    return {"a": {"path": str(a)}, "b": {"path": str(b), "split": "test"}}


def test_formats_load(tmp_path, disk_dir):
    folder = tmp_path / "folder"
    for i in range(4):
        (folder / "test" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((9, 7, 3), 40 * i, np.uint8)).save(folder / "test" / f"c{i % 2}" / f"{i}.png")
    image_ds().to_parquet(str(tmp_path / "t.parquet"))
    dd = tmp_path / "dd"
    datasets.DatasetDict({"test": image_ds(4), "validation": image_ds(2)}).save_to_disk(str(dd))
    tasks = {
        "disk": {"path": disk_dir},
        "dict": {"path": str(dd), "eval_split": "validation"},
        "folder": {"path": str(folder)},
        "parquet": {"path": str(tmp_path / "t.parquet")},
        "explicit": {"path": disk_dir, "format": "disk"},
    }
    dm = MultiTaskDataModule(tasks, batch_size=2, eval_batch_size=3, preprocessor=ImagePreprocessor(4))
    dm.setup()
    sizes = {k: sum(len(b["labels"]) for b in dm.eval_dataloader(k)) for k in dm.task_names}
    assert sizes == {"disk": N, "dict": 2, "folder": 4, "parquet": N, "explicit": N}
    assert dm.num_classes("disk") == 3 and dm.num_classes("folder") == 2 and dm.num_classes("parquet") == 3
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == set(tasks) and all(b["inputs"].shape == (2, 3, 4, 4) for b in batch.values())


def test_stream_shapes_dtypes_and_normalisation(tmp_path):
    white = tmp_path / "white"
    image_ds(value=255).save_to_disk(str(white))
    dm = MultiTaskDataModule({"w": {"path": str(white)}}, batch_size=4, preprocessor=ImagePreprocessor(8))
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))["w"]
    assert b["inputs"].shape == (4, 3, 8, 8) and b["inputs"].dtype == torch.float32
    assert b["labels"].dtype == torch.int64 and b["labels"].shape == (4,)
    torch.testing.assert_close(b["inputs"], torch.full_like(b["inputs"], (255 - 127) / 128))


def test_image_modes_resize_and_processor_config(tmp_path):
    pre = ImagePreprocessor(4, mean=(0, 0, 0), std=(1, 1, 1))
    imgs = [Image.new("L", (3, 5), 255), Image.new("RGBA", (6, 6), (0, 255, 0, 10)),
            np.zeros((7, 7), np.uint8), np.ones((5, 5, 3), np.float32)]
    x = pre({"image": imgs})["inputs"]
    assert x.shape == (4, 3, 4, 4) and "labels" not in pre({"image": imgs})
    assert torch.allclose(x[0], torch.ones(3, 4, 4)) and torch.allclose(x[1, 1], torch.ones(4, 4))
    assert x[1, 0].abs().max() == 0 and x[2].abs().max() == 0 and torch.allclose(x[3], torch.ones(3, 4, 4))
    half = np.zeros((4, 8, 3), np.uint8)
    half[:, 2:6] = 255  # centre crop of a wide image keeps only the white middle
    crop = ImagePreprocessor(4, mean=(0,) * 3, std=(1,) * 3, resize="center_crop", interpolation="nearest")
    assert torch.allclose(crop({"image": [half]})["inputs"], torch.ones(1, 3, 4, 4))
    cfg = {"crop_size": {"height": 12, "width": 12}, "do_center_crop": True, "size": {"shortest_edge": 12},
           "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    clip = ImagePreprocessor.from_pretrained_processor(tmp_path, image_column="img")
    assert (clip.image_size, clip.resize, clip.mean, clip.image_column) == (12, "center_crop", (0.5, 0.4, 0.3), "img")
    assert pickle.loads(pickle.dumps(clip)).std == (0.2,) * 3


def test_stream_reshuffles_reproducibly_and_covers_each_pass(disk_dir):
    def make(seed):
        return MultiTaskDataModule({"t": {"path": disk_dir}}, batch_size=4, seed=seed, preprocessor=idx_preprocessor)

    seq = stream_indices(make(0), "t", 10)  # 40 indices = 4 passes over 10 examples, batches straddle passes
    passes = [seq[i:i + N] for i in range(0, 40, N)]
    assert all(sorted(p) == list(range(N)) for p in passes)
    assert passes[0] != passes[1] and passes[0] != list(range(N))
    assert stream_indices(make(0), "t", 10) == seq
    assert stream_indices(make(1), "t", 10) != seq


def test_tasks_shuffle_independently_and_val_in_task_order(two_tasks):
    dm = MultiTaskDataModule(two_tasks, batch_size=3, eval_batch_size=4, preprocessor=idx_preprocessor)
    a, b = stream_indices(dm, "a", 3), stream_indices(dm, "b", 3)
    assert sorted(b[:7]) == list(range(7)) and a[:7] != b[:7]
    loaders = dm.val_dataloader()
    assert [len(dl) for dl in loaders] == [3, 2]
    assert [torch.cat([x["inputs"] for x in dl]).tolist() for dl in loaders] == [list(range(N)), list(range(7))]
    assert [torch.cat([x["labels"] for x in dl]).tolist() for dl in dm.test_dataloader()][1] == [i % 3 for i in range(7)]


def test_max_eval_samples_is_deterministic(two_tasks):
    two_tasks["a"]["max_eval_samples"] = 4
    subsets = []
    for _ in range(2):
        dm = MultiTaskDataModule(two_tasks, eval_batch_size=10, preprocessor=idx_preprocessor)
        subsets.append(next(iter(dm.eval_dataloader("a")))["inputs"].tolist())
    assert subsets[0] == subsets[1] and len(subsets[0]) == 4 and subsets[0] != [0, 1, 2, 3]
    assert sorted(stream_indices(dm, "a", 5)[:N]) == list(range(N))  # the adaptation stream keeps every example


@pytest.fixture
def tokenizer_dir(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "good", "bad", "movie"]
    path = tmp_path / "tok"  # transformers 5 takes `vocab=`; a `vocab_file=` kwarg is silently ignored
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(path))
    return str(path)


def test_text_single_and_pair(tmp_path, tokenizer_dir):
    ds = datasets.Dataset.from_dict({"sentence": ["hello world", "good movie", "bad"], "premise": ["good"] * 3,
                                     "hypothesis": ["bad movie", "hello", "x"], "label": [1, 0, 1]})
    ds.save_to_disk(str(tmp_path / "text"))
    single = TextPreprocessor(tokenizer_dir, max_length=8)
    pair = pickle.loads(pickle.dumps(TextPreprocessor(tokenizer_dir, text_columns=["premise", "hypothesis"])))
    dm = MultiTaskDataModule({"sst": {"path": str(tmp_path / "text")},
                              "nli": {"path": str(tmp_path / "text"), "preprocessor": pair}},
                             batch_size=2, eval_batch_size=3, preprocessor=single)
    out = next(iter(dm.eval_dataloader("sst")))
    ids = out["inputs"]["input_ids"]
    assert ids.shape == (3, 4) and ids[0].tolist() == [2, 5, 6, 3] and ids[2].tolist() == [2, 8, 3, 0]
    assert out["inputs"]["attention_mask"][2].tolist() == [1, 1, 1, 0] and out["labels"].tolist() == [1, 0, 1]
    nli = next(iter(dm.eval_dataloader("nli")))["inputs"]
    assert nli["input_ids"][0].tolist() == [2, 7, 3, 8, 9, 3] and nli["token_type_ids"][0].tolist() == [0, 0, 0, 1, 1, 1]
    assert set(next(iter(dm.train_dataloader()))) == {"sst", "nli"}


def test_error_messages(tmp_path, disk_dir, monkeypatch):
    pre = ImagePreprocessor(4, image_column="img")
    with pytest.raises(TaskDataError, match=r"task 'x'.*disk.*missing column.*'img'.*available columns.*'image'"):
        MultiTaskDataModule({"x": {"path": disk_dir}}, preprocessor=pre).setup()
    missing = str(tmp_path / "nope")
    with pytest.raises(TaskDataError, match=r"task 'y'.*nope.*does not exist"):
        MultiTaskDataModule({"y": {"path": missing}}, preprocessor=pre).setup()
    with pytest.raises(TaskDataError, match=r"task 'y'.*nope.*does not exist"):
        MultiTaskDataModule({"y": {"path": missing, "format": "imagefolder"}}, preprocessor=pre).setup()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying the network
    with pytest.raises(TaskDataError, match=r"task 'z'.*hub dataset 'someone/svhn'.*offline.*local path"):
        MultiTaskDataModule({"z": {"path": "someone/svhn"}}, preprocessor=pre).setup()
    with pytest.raises(TaskDataError, match=r"unknown fields \['pth'\]"):
        MultiTaskDataModule({"w": {"pth": disk_dir}})
    with pytest.raises(TaskDataError, match=r"task 'v'.*no split 'nope'.*\['test'\]"):
        datasets.DatasetDict({"test": image_ds(2)}).save_to_disk(str(tmp_path / "dd"))
        MultiTaskDataModule({"v": {"path": str(tmp_path / "dd"), "split": "nope"}}, preprocessor=pre).setup()


def test_unlabelled_dataset_streams_but_cannot_evaluate(tmp_path):
    image_ds(with_label=False).save_to_disk(str(tmp_path / "u"))
    dm = MultiTaskDataModule([TaskData(name="u", path=str(tmp_path / "u"))], batch_size=3,
                             preprocessor=ImagePreprocessor(4))
    b = next(iter(dm.train_dataloader()))["u"]
    assert b["inputs"].shape == (3, 3, 4, 4) and "labels" not in b
    assert not dm.has_labels("u") and dm.num_classes("u") is None
    with pytest.raises(TaskDataError, match=r"task 'u'.*needs labels.*'label' is missing"):
        dm.val_dataloader()


def test_stream_with_worker_matches_single_process(two_tasks):
    dms = [MultiTaskDataModule(two_tasks, batch_size=3, num_workers=w, preprocessor=idx_preprocessor) for w in (0, 1)]
    assert stream_indices(dms[1], "b", 4) == stream_indices(dms[0], "b", 4)
    # Two workers interleave their steps; the DataLoader's round-robin must restore the same order.
    dm2 = MultiTaskDataModule(two_tasks, batch_size=3, num_workers=2, preprocessor=idx_preprocessor)
    assert stream_indices(dm2, "a", 4) == stream_indices(dms[0], "a", 4)


def test_hydra_instantiate(two_tasks):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "adamerge.data.datamodule.MultiTaskDataModule", "batch_size": 2, "eval_batch_size": 5,
                            "tasks": two_tasks, "preprocessor": {"_target_": "adamerge.data.preprocessing.ImagePreprocessor",
                                                                 "image_size": 4}})
    cfg.tasks.b.preprocessor = {"_target_": "adamerge.data.preprocessing.ImagePreprocessor", "image_size": 6}
    dm = instantiate(cfg)
    assert dm.task_names == ["a", "b"] and dm.tasks["a"].split == "test"
    batch = next(iter(dm.train_dataloader()))
    assert batch["a"]["inputs"].shape == (2, 3, 4, 4) and batch["b"]["inputs"].shape == (2, 3, 6, 6)


def test_cached_inputs_equal_the_lazy_path_exactly(two_tasks, caplog):
    def make(cache: bool, **kw) -> MultiTaskDataModule:
        dm = MultiTaskDataModule(two_tasks, batch_size=4, eval_batch_size=3, seed=5, cache_inputs=cache,
                                 preprocessor=ImagePreprocessor(image_size=8), **kw)
        dm.setup()
        return dm

    cached, lazy = make(True), make(False)
    for step_cached, step_lazy in zip(itertools.islice(iter(cached.train_dataloader()), 6),
                                      itertools.islice(iter(lazy.train_dataloader()), 6)):
        for task in ("a", "b"):
            assert torch.equal(step_cached[task]["inputs"], step_lazy[task]["inputs"])
            assert torch.equal(step_cached[task]["labels"], step_lazy[task]["labels"])
    for task in ("a", "b"):
        for batch_cached, batch_lazy in zip(cached.eval_dataloader(task), lazy.eval_dataloader(task), strict=True):
            assert torch.equal(batch_cached["inputs"], batch_lazy["inputs"])
            assert torch.equal(batch_cached["labels"], batch_lazy["labels"])
    # Adaptation and evaluation read the same rows: one uint8 cache per task, none for the lazy module.
    assert {key[0] for key in cached._cache} == {"a", "b"} and len(cached._cache) == 2 and not lazy._cache
    assert all(split.encoded.dtype == torch.uint8 for split in cached._cache.values())

    tiny_budget = make(True, cache_max_gb=1e-9)  # over the budget: a warning and the lazy path
    with caplog.at_level("WARNING"):
        first = next(iter(tiny_budget.train_dataloader()))
    assert torch.equal(first["a"]["inputs"], next(iter(lazy.train_dataloader()))["a"]["inputs"])
    assert "not caching" in caplog.text


def test_cache_budget_covers_all_splits_together(two_tasks):
    def make(max_gb: float) -> MultiTaskDataModule:
        dm = MultiTaskDataModule(two_tasks, batch_size=4, seed=5, cache_max_gb=max_gb,
                                 preprocessor=ImagePreprocessor(image_size=8))
        dm.setup()
        next(iter(dm.train_dataloader()))  # builds the caches, task a first
        return dm

    everything = make(8.0)
    first = next(split for key, split in everything._cache.items() if key[0] == "a")
    room_for_one = make((first.nbytes + 1) / 2**30)
    assert [key[0] for key, split in room_for_one._cache.items() if split is not None] == ["a"]
    assert [key[0] for key, split in room_for_one._cache.items() if split is None] == ["b"]


def _saved_test_split(directory, columns: dict, features=None):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(str(directory))
    return str(directory)


def test_nan_pixels_are_refused_naming_task_split_and_row(tmp_path):
    import datasets
    import numpy as np

    from adamerge.data.datamodule import MultiTaskDataModule, TaskDataError
    from adamerge.data.preprocessing import ImagePreprocessor

    images = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32)
    images[2, 1, 1, 0] = np.nan
    features = datasets.Features({"image": datasets.Array3D((8, 8, 3), "float32"), "label": datasets.Value("int64")})
    path = _saved_test_split(tmp_path / "ds", {"image": list(images), "label": [0, 1, 0, 1]}, features)
    module = MultiTaskDataModule({"noisy": {"path": path, "split": "test"}}, preprocessor=ImagePreprocessor(8))
    module.setup()
    with pytest.raises(TaskDataError, match=r"task 'noisy' .*split 'test', row 2: the image has 1 NaN/Inf pixel"):
        module.eval_dataloader("noisy")


@pytest.mark.parametrize("sentences, expected", [
    ([1, 2, 3], r"split 'test': column 'sentence' holds Value\('int64'"),
    (["fine", None, "also fine"], r"split 'test', row 1: column 'sentence' is empty \(null\), not text"),
])
def test_text_columns_must_hold_text_in_every_row(tmp_path, sentences, expected):
    from adamerge.data.datamodule import MultiTaskDataModule, TaskDataError
    from adamerge.data.preprocessing import TextPreprocessor

    path = _saved_test_split(tmp_path / "ds", {"sentence": sentences, "label": [0, 1, 0]})
    module = MultiTaskDataModule({"sst": {"path": path, "split": "test"}},
                                 preprocessor=TextPreprocessor("never-loaded-tokenizer"))
    with pytest.raises(TaskDataError, match=rf"task 'sst' .*{expected}"):
        module.setup()


def _images_with_bad_row(directory, row: int, bad: bytes, n: int = 6):
    """A saved test split of n small PNGs whose row ``row`` holds ``bad`` bytes instead."""
    import io

    pngs = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(np.full((6, 6, 3), i * 30, dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append({"bytes": bad if i == row else buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return _saved_test_split(directory, {"image": pngs, "label": [i % 2 for i in range(n)]}, features)


@pytest.mark.parametrize("cache_inputs", [True, False])
def test_a_corrupt_image_is_refused_before_learning_on_the_cached_and_the_lazy_path(tmp_path, cache_inputs):
    path = _images_with_bad_row(tmp_path / "ds", 4, b"not an image at all")
    dm = MultiTaskDataModule({"photos": {"path": path, "split": "test"}}, batch_size=2, cache_inputs=cache_inputs,
                             preprocessor=ImagePreprocessor(8))
    dm.setup()
    # The first loader asked for (preflight asks for one example) reads every row once, whichever path the split takes.
    with pytest.raises(TaskDataError, match=r"task 'photos' .*split 'test', row 4: the example cannot be read "
                                            r"\(UnidentifiedImageError"):
        dm.eval_dataloader("photos", batch_size=1)


def test_nan_inputs_on_the_lazy_path_are_refused_naming_the_row(tmp_path):
    images = np.random.default_rng(0).random((5, 8, 8, 3), dtype=np.float32)
    images[3, 2, 2, 1] = np.inf
    features = datasets.Features({"image": datasets.Array3D((8, 8, 3), "float32"), "label": datasets.Value("int64")})
    path = _saved_test_split(tmp_path / "ds", {"image": list(images), "label": [0, 1, 0, 1, 0]}, features)
    dm = MultiTaskDataModule({"noisy": {"path": path, "split": "test"}}, cache_inputs=False,
                             preprocessor=ImagePreprocessor(8))
    with pytest.raises(TaskDataError, match=r"task 'noisy' .*split 'test', row 3: the image has 1 NaN/Inf pixel"):
        next(iter(dm.train_dataloader()))


def test_a_preprocessor_that_names_no_row_gets_its_row_found(tmp_path):
    """A user's own preprocessor (or a tokenizer) raising on one example: the row is found by retrying alone."""
    path = _saved_test_split(tmp_path / "ds", {"x": [1.0, 2.0, -1.0, 4.0], "label": [0, 1, 0, 1]})

    def square_root(batch):
        if any(value < 0 for value in batch["x"]):
            raise ValueError("negative input")
        return {"inputs": torch.tensor(batch["x"]).sqrt().unsqueeze(1)}

    dm = MultiTaskDataModule({"roots": {"path": path, "split": "test"}}, preprocessor=square_root)
    with pytest.raises(TaskDataError, match=r"task 'roots' .*split 'test', row 2: the example cannot be preprocessed "
                                            r"\(ValueError: negative input\)"):
        dm.eval_dataloader("roots")


def test_without_the_up_front_check_a_bad_row_is_still_named_when_a_batch_reaches_it(tmp_path):
    path = _images_with_bad_row(tmp_path / "ds", 1, b"\x89PNG broken")
    dm = MultiTaskDataModule({"photos": {"path": path, "split": "test"}}, eval_batch_size=2, cache_inputs=False,
                             check_inputs=False, preprocessor=ImagePreprocessor(8))
    loader = dm.eval_dataloader("photos")  # no pass over the rows: nothing is read yet
    with pytest.raises(TaskDataError, match=r"task 'photos' .*split 'test', row 1: the example cannot be read or "
                                            r"preprocessed"):
        list(loader)
    with pytest.raises(TaskDataError, match=r"split 'test', row 1"):
        next(iter(dm.train_dataloader()))


def test_the_up_front_check_reads_each_lazy_split_once(tmp_path, two_tasks):
    calls = []

    class Counting(ImagePreprocessor):
        def __call__(self, batch):
            calls.append(len(batch["image"]))
            return super().__call__(batch)

    dm = MultiTaskDataModule(two_tasks, batch_size=4, eval_batch_size=3, cache_inputs=False,
                             preprocessor=Counting(8))
    dm.setup()
    for _ in range(2):
        dm.eval_dataloader("a"), dm.eval_dataloader("b"), dm.train_dataloader()
    assert sum(calls) == N + 7  # task a's one split and task b's test split, once each
