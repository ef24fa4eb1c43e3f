"""The meta networks of the trusted-set methods: small heads that re-weight or relabel noisy samples.

They are not backbones (no ``(logits, features)`` contract, not in the registry): each method builds its
own from the main network's ``feature_dim`` and the number of classes. None of them is DDP-wrapped; their
gradients are meta-gradients that the bilevel engine averages over ranks, and every rank builds them from
the same seeded global generator, so they start identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNet(nn.Module):
    """MW-Net's VNet, per-sample loss -> weight in (0, 1): Linear(1, h) -> ReLU -> Linear(h, 1) -> sigmoid.

    PyTorch's default Linear initialisation is kept because the reference's ``MetaLinear`` wraps an
    ``nn.Linear`` and copies its initial weights.
    """

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, losses: Tensor) -> Tensor:
        """Weights ``[B]`` for per-sample losses ``[B]``; callers detach the losses, as the reference."""
        return self.net(losses.unsqueeze(1)).squeeze(1)


class LabelCorrectionNet(nn.Module):
    """MLC's label-correction network g(h(x), ỹ) -> soft label (microsoft/MLC ``meta_models.MetaNet``).

    ``features ⊕ Embedding(C, cls_dim)(ỹ)`` -> Linear(hidden) -> tanh -> Linear(hidden) -> tanh -> Linear(C)
    -> softmax. With ``skip`` the last layer has one more unit whose sigmoid α mixes the given label back in,
    ``(1 − α)·softmax + α·onehot(ỹ)``, per sample: the MLC authors' fix for Clothing1M, where learning a
    correction from scratch converged badly and starting near "keep the given label" helps.
    Initialisation as the reference: xavier-uniform embedding, xavier-normal linears, zero biases.
    """

    def __init__(
        self, num_classes: int, feature_dim: int, *, cls_dim: int = 128, hidden: int = 128, skip: bool = False
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.skip = skip
        self.embed = nn.Embedding(num_classes, cls_dim)
        self.net = nn.Sequential(
            nn.Linear(feature_dim + cls_dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes + int(skip)),
        )
        nn.init.xavier_uniform_(self.embed.weight)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """Soft labels ``[B, C]`` (rows sum to 1) for detached main-net ``features`` and given ``labels``."""
        logits = self.net(torch.cat([features, self.embed(labels)], dim=1))
        soft = F.softmax(logits[:, : self.num_classes], dim=1)
        if not self.skip:
            return soft
        alpha = torch.sigmoid(logits[:, self.num_classes :])
        return (1 - alpha) * soft + alpha * F.one_hot(labels, self.num_classes).to(soft.dtype)


class SoftLabelNet(nn.Module):
    """MetaLabelNet's single-layer soft-label generator: Linear(feature_dim, C) -> softmax on frozen features.

    It never sees the noisy label (the reference drops it after the warm-up), so what it can express is a
    linear read-out of the warm-up network's representation.
    """

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)

    def start_from(self, classifier: nn.Linear) -> None:
        """Copy a classifier's weights (same shape), so the soft labels start as that classifier's softmax."""
        with torch.no_grad():
            self.fc.weight.copy_(classifier.weight)
            self.fc.bias.copy_(classifier.bias)

    def forward(self, features: Tensor) -> Tensor:
        return F.softmax(self.fc(features), dim=1)
