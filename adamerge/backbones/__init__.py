"""Model definitions with real pretrained weights available offline."""

from adamerge.models.efficientnet import EfficientNetLite0, efficientnet_lite0, normalize_images

__all__ = ["EfficientNetLite0", "efficientnet_lite0", "normalize_images"]
