"""Backbones behind one registry; importing this package registers every family.

``build_model(name, num_classes=..., in_channels=..., image_size=..., pretrained=...)`` returns an
``nn.Module`` whose ``forward`` gives ``(logits, features)``; ``registry`` states the full contract.
"""

# The family modules are imported for their @register_model side effect.
from raynoisy.models import cifar_resnet, small_cnn, torchvision_resnet  # noqa: F401
from raynoisy.models.registry import build_model, model_names, register_model

__all__ = ["build_model", "model_names", "register_model"]
