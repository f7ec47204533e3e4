"""Preprocessors: a raw ``datasets`` batch (images or text) to the model's inputs and the labels.

They are picklable (DataLoader workers) and load nothing heavy until first called. An export records each
task's preprocessing (:func:`preprocessor_record`) so that the reloaded model turns raw images and sentences into
the inputs its run evaluated on (:func:`preprocessor_from_record`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


# PIL modes whose conversion to RGB keeps what the pixels mean. 32-bit integer ("I", "I;16", ...) and float ("F")
# images are clipped to 0..255 by the conversion: a 16-bit scan would become a nearly white picture.
RGB_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                                   "LAB", "HSV"})


class BadExampleError(ValueError):
    """One example of a batch cannot be made into a model input; ``index`` is its position in the batch (the
    data module turns it into the task, split and row)."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        self.index, self.problem = index, problem


def _to_rgb_uint8(img: Any):
    from PIL import Image, UnidentifiedImageError

    if isinstance(img, dict):  # undecoded datasets Image: {"bytes", "path"}
        import io

        try:
            img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") else Image.open(img["path"])
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL raises SyntaxError for some bad headers
            raise ValueError(f"the image cannot be decoded ({type(error).__name__}: {error})") from error
    if not isinstance(img, Image.Image):
        arr = np.asarray(img)
        if arr.dtype.kind not in "uif" or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"an image array must be HxW or HxWxC (C = 1, 3 or 4) of numbers, got shape "
                             f"{arr.shape} of {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"the image has {int((~np.isfinite(arr)).sum())} NaN/Inf pixel values")
        if arr.dtype != np.uint8:  # float images in [0, 1] are common in numpy pipelines
            arr = arr * 255.0 if arr.dtype.kind == "f" and arr.max() <= 1.0 else arr
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    if img.mode not in RGB_CONVERTIBLE_MODES:
        raise ValueError(f"image mode {img.mode!r} cannot be converted to RGB without clipping its values; convert "
                         "the images to 8-bit (L or RGB) first")
    return img.convert("RGB")


def labels_of(batch: Mapping[str, Any], column: str) -> torch.Tensor | None:
    return torch.as_tensor(np.asarray(batch[column])) if column in batch else None


class ImagePreprocessor:
    """PIL/ndarray batch → float NCHW ``(x/255 − mean)/std``; defaults give EfficientNet-Lite's (x−127)/128."""

    def __init__(self, image_size: int, mean: Sequence[float] = (127 / 255,) * 3,
                 std: Sequence[float] = (128 / 255,) * 3, image_column: str = "image",
                 label_column: str = "label", resize: str = "resize", interpolation: str = "bicubic"):
        if resize not in ("resize", "center_crop"):
            raise ValueError(f"resize must be 'resize' or 'center_crop', got {resize!r}")
        self.image_size, self.resize, self.interpolation = int(image_size), resize, interpolation
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.image_column, self.label_column = image_column, label_column

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.image_column,)

    @classmethod
    def from_pretrained_processor(cls, path_or_id: str | os.PathLike, **kw: Any) -> ImagePreprocessor:
        """Size/mean/std from a transformers ``preprocessor_config.json`` (file, dir or hub id)."""
        p = Path(path_or_id)
        if p.is_dir():
            p = p / "preprocessor_config.json"
        if not p.is_file():
            from transformers.utils import cached_file

            p = Path(cached_file(str(path_or_id), "preprocessor_config.json"))
        cfg = json.loads(p.read_text())

        def edge(s: Any) -> int | None:
            if s is None or isinstance(s, int):
                return s
            return s.get("shortest_edge") or s.get("height")

        crop = cfg.get("do_center_crop", False) and cfg.get("crop_size") is not None
        args = {"image_size": edge(cfg["crop_size"] if crop else cfg.get("size")),
                "resize": "center_crop" if crop else "resize"}
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            if cfg.get(theirs) is not None:
                args[ours] = cfg[theirs]
        return cls(**{**args, **kw})

    def _pixels(self, img: Any) -> np.ndarray:
        from PIL import Image

        img, n = _to_rgb_uint8(img), self.image_size
        resample = getattr(Image.Resampling, self.interpolation.upper())
        if self.resize == "resize":
            img = img.resize((n, n), resample)
        else:  # shortest edge to n, then centre crop: the CLIP recipe
            w, h = img.size
            s = n / min(w, h)
            img = img.resize((max(n, round(w * s)), max(n, round(h * s))), resample)
            w, h = img.size
            left, top = (w - n) // 2, (h - n) // 2
            img = img.crop((left, top, left + n, top + n))
        return np.asarray(img)

    # The cacheable split of the work (see adamerge.data.input_cache): decoding and resizing give uint8 pixels,
    # which store exactly; normalising them is cheap and done per batch.
    def encode(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Decoded, resized uint8 pixels ``[N, 3, H, W]``."""
        pixels = []
        for index, image in enumerate(batch[self.image_column]):
            try:
                pixels.append(self._pixels(image))
            except ValueError as error:
                raise BadExampleError(index, str(error)) from error
        return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)

    def decode(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels to the model's float input ``(x/255 − mean)/std``."""
        x = pixels.float().div_(255.0)
        x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        return x.contiguous()

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"inputs": self.decode(self.encode(batch))}
        if (y := labels_of(batch, self.label_column)) is not None:
            out["labels"] = y
        return out


class TextPreprocessor:
    """Tokenises one text column (or a sentence pair); the tokenizer loads lazily so the object pickles cheaply."""

    def __init__(self, tokenizer: str, text_columns: str | Sequence[str] = "sentence",
                 label_column: str = "label", max_length: int = 128, padding: str | bool = "longest"):
        self.tokenizer = str(tokenizer)
        self.text_columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"text_columns must name one or two columns, got {self.text_columns}")
        self.label_column, self.max_length, self.padding = label_column, max_length, padding
        self._tok = None

    @property
    def required_columns(self) -> tuple[str, ...]:
        return self.text_columns

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer)
        texts = [list(batch[c]) for c in self.text_columns]
        enc = self._tok(*texts, padding=self.padding, truncation=True, max_length=self.max_length,
                        return_tensors="pt")
        out: dict[str, Any] = {"inputs": dict(enc)}
        if (y := labels_of(batch, self.label_column)) is not None:
            out["labels"] = y
        return out


def preprocessor_record(preprocessor: Any) -> dict[str, Any] | None:
    """The settings that rebuild ``preprocessor`` (plain values for merge_config.json); ``None`` for kinds an export
    cannot rebuild (prompts, user classes): their tasks then take model-ready tensors."""
    if isinstance(preprocessor, ImagePreprocessor):
        return {"kind": "image", "image_size": preprocessor.image_size, "mean": list(preprocessor.mean),
                "std": list(preprocessor.std), "image_column": preprocessor.image_column,
                "resize": preprocessor.resize, "interpolation": preprocessor.interpolation}
    if isinstance(preprocessor, TextPreprocessor):
        return {"kind": "text", "text_columns": list(preprocessor.text_columns), "max_length": preprocessor.max_length,
                "padding": preprocessor.padding, "tokenizer_source": preprocessor.tokenizer}
    return None


def preprocessor_from_record(record: Mapping[str, Any], export_dir: str | os.PathLike) -> ImagePreprocessor | TextPreprocessor:
    """The preprocessor a record describes; a text one uses the tokenizer saved in the export when there is one."""
    settings = {key: value for key, value in record.items() if key != "kind"}
    if record.get("kind") == "image":
        return ImagePreprocessor(**settings)
    if record.get("kind") == "text":
        source = settings.pop("tokenizer_source")
        own = Path(export_dir) / "tokenizer_config.json"
        return TextPreprocessor(str(export_dir) if own.is_file() else source, **settings)
    raise ValueError(f"unknown preprocessing kind {record.get('kind')!r} (known: image, text)")
