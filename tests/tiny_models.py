"""A BatchNorm-free backbone for method tests: fast, and its result does not depend on how a batch is split
across ranks (so a 2-rank step can be compared with one process on the concatenated batch)."""

from __future__ import annotations

from torch import Tensor, nn

from raynoisy.models import model_names, register_model


class MLPBackbone(nn.Module):
    """flatten -> Linear -> tanh (the features) -> fc: the backbone contract without BatchNorm."""

    def __init__(self, num_classes: int, inputs: int, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, feature_dim), nn.Tanh())
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.fc(features), features


def tiny_mlp(feature_dim: int) -> str:
    """Register (once) and name the MLP backbone with ``feature_dim`` features, for any input size."""
    name = f"test-mlp-{feature_dim}"
    if name not in model_names():

        @register_model(name)
        def build(
            *, num_classes: int, in_channels: int, image_size: int, pretrained: str | None
        ) -> MLPBackbone:
            return MLPBackbone(num_classes, in_channels * image_size * image_size, feature_dim)

    return name
