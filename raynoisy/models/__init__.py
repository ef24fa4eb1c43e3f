"""Backbones behind one registry; importing this package registers every family.

``build_model(name, num_classes=..., in_channels=..., image_size=..., pretrained=...)`` returns an
``nn.Module`` whose ``forward`` gives ``(logits, features)``; ``registry`` states the full contract.
"""

import importlib
import pkgutil

from raynoisy.models.registry import build_model, check_config, model_names, register_model

# Every module of the package is imported for its @register_model side effect: the decorator is the only
# registration.
for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["build_model", "check_config", "model_names", "register_model"]
