"""Bad inputs a real user hits: each fails with exit code 1 and one specific message, writes nothing half-done.

Every case composes the real configuration (``conf/``) with Hydra's compose API and runs it in-process, twice:

- through :func:`adamerge.cli.main.execute`, the command's own path: exit code 1, one ``adamerge: error: ...`` line on
  stderr that names the file / parameter / value to change, no traceback;
- through :func:`adamerge.cli.runner.run`, the Python API: it raises an :class:`adamerge.errors.AdamergeError` carrying
  the same text.

Each run gets its own run directory; after it, no ``results.json`` / ``summary.json`` / ``merged_model`` /
``checkpoints`` may have appeared there, and anything the case put there beforehand is byte-identical. A bad
input is one copied and edited file in the test's tmp dir (a checkpoint, a head, a dataset); the shared reduced
demo zoo is never modified. Cases that must fail before the checkpoints are loaded also check that the runner's
``task vectors:`` line (printed once every fine-tuned checkpoint is loaded) never appeared.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import adamerge.cli.main
import adamerge.methods.configs
import adamerge.cli.runner
from adamerge.errors import AdamergeError

# The runner's line after every fine-tuned checkpoint is loaded: absent when a run fails before loading them.
LOADED_MARKER = "task vectors:"
# What a finished (or half-finished) run writes; none may appear after a failed one unless the case put it there.
RUN_OUTPUTS = {"results.json", "summary.json", "summary.md", "merged_model", "checkpoints"}
BASE_OVERRIDES = ("num_threads=1", "logger=none", "data.eval_batch_size=64", "data.batch_size=8",
                  "trainer.max_steps=2", "trainer.enable_progress_bar=false")
EMPTY = re.compile(r"empty|no examples|0 examples", re.IGNORECASE)
STEM = "_conv_stem.weight"
PROJECT = "_blocks.0._project_conv.weight"

# A run that should fail in seconds must never hang the suite (an empty split used to make the stream loop).
pytestmark = pytest.mark.timeout(60, func_only=True)


# --- the zoo and the bad files ---------------------------------------------------------------------------------------
def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def edited_checkpoint(source: str, edit: Callable[[dict], None], check: Callable[[dict], bool]) -> Callable:
    """Copy ``<zoo>/<source>`` to ``<inputs>/ckpt_copy.safetensors`` with ``edit`` applied (verified by ``check``)."""

    def make(zoo: Path, inputs: Path) -> None:
        state = _load(zoo / source)
        edit(state)
        target = _save(state, inputs / "ckpt_copy.safetensors")
        assert check(_load(target)), "the edited checkpoint is not what the case means"

    return make


def truncated_checkpoint(zoo: Path, inputs: Path) -> None:
    data = (zoo / "finetuned" / "digits.safetensors").read_bytes()
    (inputs / "ckpt_copy.safetensors").write_bytes(data[: len(data) // 2])


def _set(key: str, index: tuple, value: float) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[key] = state[key].clone()
        state[key][index] = value

    return edit


def _huge_project_conv(state: dict) -> None:
    # Finite (so the early NaN/Inf check of the checkpoint passes), but a projection conv (no activation after it)
    # this large overflows its outputs to ±inf; the next 1x1 conv sums +inf and -inf into NaN logits.
    state[PROJECT] = torch.full_like(state[PROJECT], 3e38)


def head_file(num_classes: int, in_features: int | None) -> Callable:
    """A digits head with ``num_classes`` rows (and ``in_features`` columns; None keeps the real width)."""

    def make(zoo: Path, inputs: Path) -> None:
        real = _load(zoo / "heads" / "digits.safetensors")
        weight, bias = real["weight"][:num_classes], real["bias"][:num_classes]
        if in_features is not None:
            weight = torch.randn(num_classes, in_features)
        _save({"weight": weight, "bias": bias}, inputs / "head_copy.safetensors")
        saved = _load(inputs / "head_copy.safetensors")
        assert tuple(saved["weight"].shape) == (num_classes, in_features or real["weight"].shape[1])
        assert tuple(saved["bias"].shape) == (num_classes,)

    return make


def edited_dataset(edit: Callable, check: Callable) -> Callable:
    """Copy ``<zoo>/data/digits`` (a DatasetDict saved with save_to_disk) to ``<inputs>/ds_copy`` with ``edit``."""

    def make(zoo: Path, inputs: Path) -> None:
        import datasets

        dataset = edit(datasets.load_from_disk(str(zoo / "data" / "digits")))
        dataset.save_to_disk(str(inputs / "ds_copy"))
        assert check(datasets.load_from_disk(str(inputs / "ds_copy"))), "the edited dataset is not what the case means"

    return make


def _empty_test_split(d):
    # filter, not select([]): datasets cannot save_to_disk an empty select() (IndexError in its sharding).
    return d.__class__({"train": d["train"], "test": d["test"].filter(lambda _: False)})


def _with_test_image(row: int, image_bytes: bytes) -> Callable:
    """Replace the encoded bytes of one test image (the image column read undecoded, so any bytes can go in)."""

    def edit(d):
        import datasets

        test = d["test"].cast_column("image", datasets.Image(decode=False))
        test = test.map(lambda example, index: {"image": {"bytes": image_bytes, "path": None}} if index == row
                        else example, with_indices=True)
        return datasets.DatasetDict({"train": d["train"], "test": test.cast_column("image", datasets.Image())})

    return edit


def _test_image_bytes(row: int) -> Callable:
    def check(d) -> bool:
        import datasets

        return d["test"].cast_column("image", datasets.Image(decode=False))[row]["image"]["bytes"]

    return check


def _png_16bit() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _test_label(row: int, value: int) -> Callable:
    def edit(d):
        import datasets

        test = d["test"].cast_column("label", datasets.Value("int64"))
        test = test.map(lambda example, index: {"label": value} if index == row else example, with_indices=True)
        return datasets.DatasetDict({"train": d["train"], "test": test})

    return edit


# --- what the run dir held before -----------------------------------------------------------------------------------
def existing_export(run_dir: Path) -> None:
    (run_dir / "merged_model").mkdir(parents=True)
    (run_dir / "merged_model" / "model.safetensors").write_bytes(b"an earlier run's export")
    (run_dir / "coefficients.png").write_bytes(b"an earlier run's heatmap")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("earlier: run\n")


def existing_learning_checkpoint(run_dir: Path) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's Lightning checkpoint")


def empty_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)


def file_as_parent(run_dir: Path) -> None:
    run_dir.parent.parent.mkdir(parents=True, exist_ok=True)
    run_dir.parent.write_text("a regular file where the run directory's parent should be\n")


def unreadable_run_record(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.json").write_text("{half a record")


def foreign_run_record(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.json").write_text('{"seed": 12345}\n')


def not_a_checkpoint(zoo: Path, inputs: Path) -> None:
    (inputs / "notes.safetensors").write_text("these are notes, not tensors\n")


# --- the cases -------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    overrides: tuple[str, ...]  # "{zoo}" and "{inputs}" are filled in
    # Checked on the message with the test's tmp dir and the zoo written as <tmp> / <zoo>, so a path never satisfies
    # them by accident; a str is a substring, a Pattern a regex search; "{run_dir}" in a str: the raw run-dir path.
    expect: tuple
    make_input: Callable[[Path, Path], None] | None = None
    prepare: Callable[[Path], None] | None = None  # what the run dir holds before the run
    run_subpath: str = "run"
    fails_before_loading: bool = False  # no "task vectors:" line
    reads_no_checkpoint: bool = False  # neither the pretrained nor any fine-tuned checkpoint is opened
    error_class: str | None = None  # the exception's class name, where the spec fixes it


LEARNED = "method=adamerging_task_wise"
STATIC = "method=task_arithmetic"
CONFIG = {"fails_before_loading": True, "reads_no_checkpoint": True}  # bad settings: fail before any checkpoint read

CASES: dict[str, Case] = {
    # --- settings ---
    "01-lr-not-a-number": Case(("method=adamerging_layer_wise", "method.lr=abc"), ("lr='abc'",), **CONFIG),
    "02-init-value-not-a-number": Case(("method=adamerging_layer_wise", "method.init_value=abc"), ("init_value",),
                                       **CONFIG),
    "03-init-value-wrong-length": Case(("method=adamerging_task_wise", "method.init_value=[0.3,0.3]"),
                                       ("init_value",), **CONFIG),
    "04-clamp-not-a-bool": Case(("method=adamerging_layer_wise", "method.clamp=maybe"), ("clamp",), **CONFIG),
    "05-ties-top-k-above-1": Case(("method=ties", "method.top_k=1.5"), ("top_k=1.5",), **CONFIG),
    "06-dare-drop-rate-1": Case(("method=dare", "method.drop_rate=1.0"), ("drop_rate",), **CONFIG),
    "07-negative-meta-steps": Case(("method=concrete_adamerging_layer_wise", "method.meta_steps=-1"),
                                   ("meta_steps",), **CONFIG),
    "08-missing-mask-path": Case(("method=concrete_adamerging_layer_wise",
                                  "method.mask_path=/nowhere/mask.safetensors"), ("mask_path",), **CONFIG),
    "09-max-steps-0": Case(("method=adamerging_layer_wise", "trainer.max_steps=0"), ("trainer.max_steps=0",),
                           **CONFIG),
    "10-max-steps-not-a-number": Case(("method=adamerging_layer_wise", "trainer.max_steps=abc"),
                                      ("trainer.max_steps", "abc"), **CONFIG),
    "11-unknown-method-in-comparison": Case(("method=compare", "method.methods=[task_arithmetic,no_such_method]"),
                                            ("no_such_method",), **CONFIG),
    "12-batch-size-0": Case((LEARNED, "data.batch_size=0"), ("data.batch_size=0",), **CONFIG),
    "13-eval-batch-size-0": Case((STATIC, "data.eval_batch_size=0"), ("data.eval_batch_size=0",), **CONFIG),
    "14-confidence-threshold-2": Case((LEARNED, "objective=confident_entropy", "objective.threshold=2"),
                                      ("threshold",), **CONFIG),
    "33-layer-groups-nonsense": Case(("method=adamerging_layer_wise", "method.layer_groups=nonsense_value"),
                                     ("layer_groups",), **CONFIG),
    "x1-seed-not-a-number": Case((STATIC, "seed=abc"), ("seed", "abc"), **CONFIG),
    "x1-unknown-selection-criterion": Case((STATIC, "selection.name=accuracy"), ("selection.name='accuracy'",
                                                                                  "entropy", "objective"), **CONFIG),
    "y01-ties-scope-unknown": Case(("method=ties", "method.scope=layer"), ("scope", "layer"), **CONFIG),
    "y02-ties-scaling-not-a-number": Case(("method=ties", "method.scaling_coefficient=abc"),
                                          ("scaling_coefficient", "abc"), **CONFIG),
    "y03-dare-combine-unknown": Case(("method=dare", "method.combine=sum"), ("combine", "sum"), **CONFIG),
    "y04-breadcrumbs-band-empty": Case(("method=breadcrumbs", "method.top_beta=0.6", "method.bottom_gamma=0.6"),
                                       ("top_beta", "bottom_gamma"), **CONFIG),
    "y05-pcb-clamp-ratio-half": Case(("method=pcb", "method.clamp_ratio=0.5"), ("clamp_ratio", "0.5"), **CONFIG),
    "y06-pcb-inter-balancing-unknown": Case(("method=pcb", "method.inter_balancing=softmax"),
                                            ("inter_balancing", "softmax"), **CONFIG),
    "y07-tsv-rank-fraction-0": Case(("method=tsv_merge", "method.rank_fraction=0"), ("rank_fraction",), **CONFIG),
    "y08-iso-cts-common-fraction-above-1": Case(("method=iso_cts", "method.common_space_fraction=1.5"),
                                                ("common_space_fraction", "1.5"), **CONFIG),
    "y09-iso-c-pointwise-not-a-bool": Case(("method=iso_c", "method.pointwise_convs=maybe"), ("pointwise_convs",),
                                           **CONFIG),
    "y10-wudi-negative-steps": Case(("method=wudi", "method.steps=-1"), ("steps", "-1"), **CONFIG),
    "y11-wudi-lr-0": Case(("method=wudi", "method.lr=0"), ("lr",), **CONFIG),
    "y12-wudi-non-matrix-unknown": Case(("method=wudi", "method.non_matrix=average"), ("non_matrix", "average"),
                                        **CONFIG),
    "y13-task-arithmetic-one-lambda-too-few": Case((STATIC, "method.scaling_coefficient=[0.3]"),
                                                   ("scaling_coefficient",), **CONFIG),
    "y14-unknown-hyperparameter": Case((STATIC, "+method.scaling=0.3"), ("scaling",), **CONFIG),
    "y15-learned-lr-negative": Case((LEARNED, "method.lr=-1"), ("lr",), **CONFIG),
    "y16-max-steps-negative": Case((LEARNED, "trainer.max_steps=-5"), ("trainer.max_steps=-5",), **CONFIG),
    "y17-batch-size-not-a-number": Case((LEARNED, "data.batch_size=abc"), ("data.batch_size", "abc"), **CONFIG),
    "y18-export-overwrite-not-a-bool": Case((LEARNED, "export.overwrite=maybe"), ("export.overwrite", "maybe"),
                                            **CONFIG),
    "y19-export-static-not-a-bool": Case((STATIC, "export.static=sometimes"), ("export.static", "sometimes"),
                                         **CONFIG),
    "y20-sign-key-missing": Case((LEARNED, "export.sign={key:{inputs}/absent.pem}"), ("export.sign.key",
                                                                                     "absent.pem"), **CONFIG),
    "y21-sign-unknown-setting": Case((LEARNED, "export.sign={private_key:{inputs}/absent.pem}"),
                                     ("export.sign", "private_key"), **CONFIG),
    "y22-sign-not-a-mapping": Case((LEARNED, "export.sign=mykey.pem"), ("export.sign", "mykey.pem"), **CONFIG),
    "y23-comparison-with-no-methods": Case(("method=compare", "method.methods=[]"), ("method.methods",), **CONFIG),
    "y24-finetuned-not-a-checkpoint": Case((STATIC, "modelpool.finetuned.digits={inputs}/notes.safetensors"),
                                           ("notes.safetensors",), make_input=not_a_checkpoint),
    "y25-pretrained-not-a-checkpoint": Case((STATIC, "modelpool.pretrained={inputs}/notes.safetensors"),
                                            ("notes.safetensors",), make_input=not_a_checkpoint,
                                            fails_before_loading=True),
    "y26-resume-record-unreadable": Case((LEARNED, "resume=true"), ("run_config.json", "unreadable"),
                                         prepare=unreadable_run_record, fails_before_loading=True,
                                         error_class="RunDirectoryError"),
    "y27-resume-with-other-settings": Case((LEARNED, "resume=true"), ("other settings", "data.batch_size"),
                                           prepare=foreign_run_record, fails_before_loading=True,
                                           error_class="RunDirectoryError"),
    # --- pool and data disagree ---
    "15-data-lacks-a-pool-task": Case((STATIC, "~data.tasks.science"), ("science",), fails_before_loading=True),
    "x2-head-key-misspelled": Case(
        (STATIC, "~modelpool.heads.digits",
         "+modelpool.heads.digit={_target_:adamerge.backbones.heads.linear_head,path:'{zoo}/heads/digits.safetensors'}"),
        ("modelpool.heads", "digits"), fails_before_loading=True),
    # --- checkpoints ---
    "16-missing-finetuned-checkpoint": Case((STATIC, "modelpool.finetuned.digits={inputs}/missing.safetensors"),
                                            ("missing.safetensors",), **CONFIG),
    "17-truncated-finetuned-checkpoint": Case((STATIC, "modelpool.finetuned.digits={inputs}/ckpt_copy.safetensors"),
                                              ("ckpt_copy.safetensors",), make_input=truncated_checkpoint),
    "18-finetuned-tensor-wrong-shape": Case(
        (STATIC, "modelpool.finetuned.digits={inputs}/ckpt_copy.safetensors"), ("ckpt_copy.safetensors", STEM),
        make_input=edited_checkpoint("finetuned/digits.safetensors",
                                     lambda s: s.update({STEM: s[STEM][:, :2].clone()}),
                                     lambda s: tuple(s[STEM].shape) == (32, 2, 3, 3))),
    "19-finetuned-nan": Case(
        (STATIC, "modelpool.finetuned.digits={inputs}/ckpt_copy.safetensors"),
        ("ckpt_copy.safetensors", re.compile(rf"NaN|{re.escape(STEM)}")),
        make_input=edited_checkpoint("finetuned/digits.safetensors", _set(STEM, (0, 0, 0, 0), float("nan")),
                                     lambda s: int(s[STEM].isnan().sum()) == 1)),
    "20-finetuned-missing-key": Case(
        (STATIC, "modelpool.finetuned.digits={inputs}/ckpt_copy.safetensors"),
        ("ckpt_copy.safetensors", "_blocks.3._depthwise_conv.weight"),
        make_input=edited_checkpoint("finetuned/digits.safetensors",
                                     lambda s: s.pop("_blocks.3._depthwise_conv.weight"),
                                     lambda s: "_blocks.3._depthwise_conv.weight" not in s and STEM in s)),
    "21-pretrained-inf": Case(
        (STATIC, "modelpool.pretrained={inputs}/ckpt_copy.safetensors"), ("ckpt_copy.safetensors",),
        make_input=edited_checkpoint("pretrained.safetensors", _set(STEM, (0, 0, 0, 0), float("inf")),
                                     lambda s: int(s[STEM].isinf().sum()) == 1),
        fails_before_loading=True),
    "x3-missing-pretrained-checkpoint": Case((STATIC, "modelpool.pretrained={inputs}/absent.safetensors"),
                                             ("absent.safetensors",), fails_before_loading=True),
    "x4-missing-head-file": Case((STATIC, "modelpool.heads.digits.path={inputs}/absent.safetensors"),
                                 ("absent.safetensors",), fails_before_loading=True),
    # --- data ---
    "22-empty-test-split-learned": Case(
        (LEARNED, "data.tasks.digits.path={inputs}/ds_copy"), ("digits", EMPTY),
        make_input=edited_dataset(_empty_test_split, lambda d: len(d["test"]) == 0 and len(d["train"]) > 0)),
    "22b-empty-test-split-static": Case(
        (STATIC, "data.tasks.digits.path={inputs}/ds_copy"), ("digits", EMPTY),
        make_input=edited_dataset(_empty_test_split, lambda d: len(d["test"]) == 0 and len(d["train"]) > 0)),
    "23-no-image-column": Case(
        (LEARNED, "data.tasks.digits.path={inputs}/ds_copy"), ("image", "digits"),
        make_input=edited_dataset(lambda d: d.rename_column("image", "picture"),
                                  lambda d: d["test"].column_names == ["picture", "label"])),
    "24-no-label-column": Case(
        (STATIC, "data.tasks.digits.path={inputs}/ds_copy"), ("label", re.compile(r"digits|ds_copy")),
        make_input=edited_dataset(lambda d: d.remove_columns("label"), lambda d: d["test"].column_names == ["image"])),
    "25-head-has-fewer-classes": Case(
        (STATIC, "modelpool.heads.digits.path={inputs}/head_copy.safetensors"),
        ("digits", re.compile(r"(?<![\d.])5(?![\d.])"), re.compile(r"(?<![\d.])10(?![\d.])")),
        make_input=head_file(5, None)),
    "26-head-input-size-mismatch": Case(
        (STATIC, "modelpool.heads.digits.path={inputs}/head_copy.safetensors"), ("digits", "input"),
        make_input=head_file(10, 100)),
    "27-data-path-missing": Case((STATIC, "data.tasks.digits.path={inputs}/nope"), ("nope",)),
    # ++: the demo's task entries do not declare max_eval_samples (Hydra asks for + to add a key).
    "34-max-eval-samples-0": Case((STATIC, "++data.tasks.digits.max_eval_samples=0"),
                                  ("digits", re.compile(rf"{EMPTY.pattern}|max_eval_samples=0", re.IGNORECASE))),
    "x5-unknown-split": Case((STATIC, "data.tasks.digits.split=validation"), ("digits", "validation")),
    "x8-undecodable-image": Case(
        (LEARNED, "data.tasks.digits.path={inputs}/ds_copy"), ("task 'digits'", "split 'test', row 5", "cannot be read",
                                                               "UnidentifiedImageError"),
        make_input=edited_dataset(_with_test_image(5, b"not an image at all"),
                                  lambda d: _test_image_bytes(5)(d) == b"not an image at all"),
        fails_before_loading=True, error_class="TaskDataError"),
    "x9-16-bit-image": Case(
        (LEARNED, "data.tasks.digits.path={inputs}/ds_copy"), ("task 'digits'", "split 'test', row 3", "mode 'I"),
        make_input=edited_dataset(_with_test_image(3, _png_16bit()), lambda d: _test_image_bytes(3)(d) == _png_16bit()),
        fails_before_loading=True, error_class="TaskDataError"),
    # The same images on the lazy path (no input cache): read once before learning, refused with the same detail.
    "x8b-undecodable-image-lazy": Case(
        (LEARNED, "data.tasks.digits.path={inputs}/ds_copy", "data.cache_inputs=false"),
        ("task 'digits'", "split 'test', row 5", "cannot be read", "UnidentifiedImageError"),
        make_input=edited_dataset(_with_test_image(5, b"not an image at all"),
                                  lambda d: _test_image_bytes(5)(d) == b"not an image at all"),
        fails_before_loading=True, error_class="TaskDataError"),
    "x9b-16-bit-image-lazy": Case(
        (LEARNED, "data.tasks.digits.path={inputs}/ds_copy", "data.cache_inputs=false"),
        ("task 'digits'", "split 'test', row 3", "mode 'I"),
        make_input=edited_dataset(_with_test_image(3, _png_16bit()), lambda d: _test_image_bytes(3)(d) == _png_16bit()),
        fails_before_loading=True, error_class="TaskDataError"),
    "x10-label-minus-one": Case(
        (LEARNED, "data.tasks.digits.path={inputs}/ds_copy"), ("task 'digits'", "split 'test', row 4", "label -1",
                                                               "0..9"),
        make_input=edited_dataset(_test_label(4, -1), lambda d: d["test"][4]["label"] == -1),
        fails_before_loading=True, error_class="TaskDataError"),
    "x11-label-not-an-integer": Case(
        (STATIC, "data.tasks.digits.path={inputs}/ds_copy"), ("task 'digits'", "split 'test'", "not an integer"),
        make_input=edited_dataset(lambda d: d.__class__({"train": d["train"], "test": d["test"].cast_column(
            "label", __import__("datasets").Value("float32"))}), lambda d: d["test"].features["label"].dtype == "float32"),
        fails_before_loading=True, error_class="TaskDataError"),
    # --- export ---
    "x6-per-task-hf-with-linear-heads": Case((LEARNED, "export.per_task_hf=true"), ("export.per_task_hf", "Linear"),
                                             fails_before_loading=True, error_class="ConfigError"),
    "x7-empty-license": Case((LEARNED, "export.license=''"), ("export.license=''",), **CONFIG),
    # --- the run directory ---
    "28-export-exists": Case((LEARNED,), ("merged_model", "export.overwrite"), prepare=existing_export, **CONFIG),
    "29-run-dir-parent-is-a-file": Case((STATIC,), ("a_file",), prepare=file_as_parent, run_subpath="a_file/run",
                                        fails_before_loading=True),
    "30-resume-without-checkpoint": Case((LEARNED, "resume=true"), ("resume", "{run_dir}"), prepare=empty_run_dir,
                                         fails_before_loading=True, error_class="RunDirectoryError"),
    "31-checkpoints-exist-without-resume": Case((LEARNED,), ("resume=true",), prepare=existing_learning_checkpoint,
                                                fails_before_loading=True),
    # --- learning ---
    "32-non-finite-objective": Case(
        (LEARNED, "method.clamp=false", "method.init_value=1.0",
         "modelpool.finetuned.digits={inputs}/ckpt_copy.safetensors"),
        ("step",),
        make_input=edited_checkpoint("finetuned/digits.safetensors", _huge_project_conv,
                                     lambda s: bool(s[PROJECT].isfinite().all()) and float(s[PROJECT].min()) > 1e38),
        error_class="NonFiniteError"),
}


# --- running one case -----------------------------------------------------------------------------------------------
def compose(zoo: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    adamerge.cli.main.register_resolvers()
    with initialize_config_dir(config_dir=str(adamerge.methods.configs.CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"zoo_dir={zoo}", *BASE_OVERRIDES, *overrides])


def snapshot(root: Path) -> dict[Path, bytes | None]:
    """Every path under ``root``: a file's bytes, None for a directory."""
    if not root.exists():
        return {}
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def checkpoint_reads(monkeypatch) -> list[str]:
    """The safetensors files the run opens (resolved paths), wherever adamerge holds a reference to the loader."""
    import sys

    import safetensors.torch

    reads: list[str] = []
    original = safetensors.torch.load_file

    def recording(filename, *args, **kwargs):
        reads.append(str(Path(os.fspath(filename)).resolve()))
        return original(filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", recording)
    for name, module in list(sys.modules.items()):
        if name.startswith("adamerge") and getattr(module, "load_file", None) is original:
            monkeypatch.setattr(module, "load_file", recording)
    return reads


def check_nothing_half_written(before: dict, after: dict, base: Path) -> None:
    changed = [str(p.relative_to(base)) for p, data in before.items() if after.get(p, b"<gone>") != data]
    assert not changed, f"a failed run changed or removed what was there before: {changed}"
    written = [p.relative_to(base) for p in after if p not in before]
    bad = [str(p) for p in written if RUN_OUTPUTS & set(p.parts)]
    assert not bad, f"a failed run left outputs behind: {bad}"


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_fails_with_one_specific_message(case_id, zoo, tmp_path, capsys, monkeypatch, checkpoint_reads):
    case = CASES[case_id]
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    if case.make_input is not None:
        case.make_input(zoo, inputs)
    overrides = [o.replace("{zoo}", str(zoo)).replace("{inputs}", str(inputs)) for o in case.overrides]
    try:
        cfg = compose(zoo, overrides)
    except Exception as error:  # e.g. a setting the config does not have (yet)
        pytest.fail(f"the configuration does not compose with {overrides}: {type(error).__name__}: {error}")
    pool_checkpoints = {str((zoo / "pretrained.safetensors").resolve())} | {
        str(p.resolve()) for p in (zoo / "finetuned").glob("*.safetensors")}

    def scrub(text: str) -> str:
        for root, label in ((tmp_path / "cli", "<base>"), (tmp_path / "api", "<base>"), (tmp_path, "<tmp>"),
                            (zoo, "<zoo>")):
            text = text.replace(str(root.resolve()), label).replace(str(root), label)
        return text

    def check_message(message: str, run_dir: Path, where: str) -> None:
        scrubbed = scrub(message)
        for expected in case.expect:
            if isinstance(expected, re.Pattern):
                assert expected.search(scrubbed), f"{where}: no match for {expected.pattern!r} in: {message}"
            elif "{run_dir}" in expected:
                path = expected.replace("{run_dir}", str(run_dir))
                assert path in message, f"{where}: the message does not name {path}: {message}"
            else:
                assert expected in scrubbed, f"{where}: {expected!r} is not in: {message}"

    def attempt(mode: str):
        base = tmp_path / mode
        base.mkdir()
        run_dir = base / case.run_subpath
        if case.prepare is not None:
            case.prepare(run_dir)
        before = snapshot(base)
        checkpoint_reads.clear()
        return base, run_dir, before

    # 1. The command: exit code 1 and one clean, specific line.
    base, run_dir, before = attempt("cli")
    status = adamerge.cli.main.execute(copy.deepcopy(cfg), run_dir)
    out, err = capsys.readouterr()
    assert status == 1, f"exit code {status}, not 1; stderr: {err[-1500:]}"
    assert "adamerge: error: " in err, err[-1500:]
    message = err[err.index("adamerge: error: ") + len("adamerge: error: "):]
    message = message.split("\n(set HYDRA_FULL_ERROR=1", 1)[0].strip()
    assert "Traceback" not in err, err[-3000:]
    check_message(message, run_dir, "command")
    if case.error_class is not None:
        assert message.startswith(f"{case.error_class}: "), f"not a {case.error_class}: {message}"
    if case.fails_before_loading:
        assert LOADED_MARKER not in out, f"failed only after loading every checkpoint: {message}"
    if case.reads_no_checkpoint:
        opened = [p for p in checkpoint_reads if p in pool_checkpoints]
        assert not opened, f"read {len(opened)} pool checkpoint(s) before failing, e.g. {opened[0]}: {message}"
    check_nothing_half_written(before, snapshot(base), base)

    # 2. The Python API: an AdamergeError with the same text.
    base, run_dir, before = attempt("api")
    with pytest.raises(Exception) as raised:
        adamerge.cli.runner.run(copy.deepcopy(cfg), run_dir)
    capsys.readouterr()
    error = raised.value
    assert isinstance(error, AdamergeError), (
        f"run() raised {type(error).__module__}.{type(error).__name__}, not an AdamergeError: {error}")
    if case.error_class is not None:
        assert case.error_class in [c.__name__ for c in type(error).__mro__], f"not a {case.error_class}: {error!r}"
    check_message(str(error), run_dir, "Python API")
    assert scrub(f"{type(error).__name__}: {error}") == scrub(message), (
        f"the API's error and the command's message differ:\n{type(error).__name__}: {error}\n{message}")
    check_nothing_half_written(before, snapshot(base), base)


def test_every_case_has_its_own_id_and_the_battery_is_complete():
    assert len(CASES) >= 74  # 47 before issue 25b; the battery only grows
    numbered = {k.split("-", 1)[0].rstrip("b") for k in CASES if k[0].isdigit()}
    assert numbered == {f"{i:02d}" for i in range(1, 35)}
