"""Backbone registry: one name per architecture, one builder signature for all of them.

Methods and the trainer build networks only through ``build_model``, so adding an architecture is one
module with a ``@register_model`` builder and nothing else changes. Every backbone honours one contract,
which ``build_model`` checks so a new family cannot break the methods silently:

- ``forward(x)`` returns ``(logits, features)``: ``logits`` is ``[B, num_classes]``, ``features`` is
  ``[B, feature_dim]``, the pooled penultimate representation (the input of the last linear layer). MLC's
  label-correction net, MetaLabelNet's soft-label layer and MixNN's kNN index all read these features.
- ``feature_dim`` is an int attribute and the last layer is an ``nn.Linear`` called ``fc``, because GLC
  re-initialises the classifier between its two phases.
- No in-place operation on a tensor autograd saves, and no ``inplace=True`` ReLU: the meta-learning
  methods differentiate twice through ``torch.func.functional_call``.
- Initialisation draws only from torch's global generator, so ``torch.manual_seed`` fixes every parameter
  and buffer, which the distributed trainer relies on to start all workers identical.

A family is registered for one input modality: image backbones take float ``[B, C, H, W]``; text encoders
take int64 token ids ``[B, L]`` padded with their tokenizer's pad id, and the arguments ``layers`` (keep
the first N transformer layers, ``model.layers``) and ``freeze_embeddings`` (``model.freeze_embeddings``).
A run pairs a text source with a text family only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, TypeVar

from torch import nn

from raynoisy.config import Config
from raynoisy.errors import ConfigError

Modality = Literal["image", "text"]


class ModelBuilder(Protocol):
    """What ``@register_model`` decorates: keyword arguments in, a backbone out (text families also take
    ``layers: int | None`` and ``freeze_embeddings: bool``)."""

    def __call__(
        self, *, num_classes: int, in_channels: int, image_size: int, pretrained: str | None
    ) -> nn.Module: ...


BuilderT = TypeVar("BuilderT", bound=ModelBuilder)

# Checks what ``model.pretrained`` names can be had, before Ray starts: (pretrained, image_size) -> None.
PretrainedCheck = Callable[[str | None, int], None]

_BUILDERS: dict[str, ModelBuilder] = {}
_PRETRAINED_CHECKS: dict[str, PretrainedCheck] = {}
_MODALITIES: dict[str, Modality] = {}


def register_model(
    name: str, *, check_pretrained: PretrainedCheck | None = None, modality: Modality = "image"
) -> Callable[[BuilderT], BuilderT]:
    """Decorator registering ``builder`` under ``name``; a second registration of a name is a bug.

    ``check_pretrained`` lets the family refuse weights it cannot get (no network, a missing file) when the
    config is checked, rather than inside every Ray worker; without it, any ``model.pretrained`` is refused.
    """

    def decorator(builder: BuilderT) -> BuilderT:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = builder
        _MODALITIES[name] = modality
        _PRETRAINED_CHECKS[name] = check_pretrained or (
            lambda pretrained, _size: reject_pretrained(name, pretrained)
        )
        return builder

    return decorator


def check_config(cfg: Config, image_size: int, modality: Modality = "image") -> None:
    """The model part of a run's config: a known backbone for the data's ``modality``, ``model.layers`` only
    where it applies, and pretrained weights that can be had."""
    name = cfg.model.name
    if name not in _BUILDERS:
        raise ConfigError("model.name", f"unknown model {name!r}", f"use one of {model_names()}")
    if _MODALITIES[name] != modality:
        raise ConfigError(
            "model.name",
            f"{name} is a{'n' if _MODALITIES[name] == 'image' else ''} {_MODALITIES[name]} model and "
            f"{cfg.data.dataset} is {modality} data",
            f"use one of {model_names(modality)}",
        )
    if cfg.model.layers is not None and modality != "text":
        raise ConfigError("model.layers", f"{name} has no transformer layers to keep", "drop model.layers")
    if cfg.model.freeze_embeddings and modality != "text":
        raise ConfigError(
            "model.freeze_embeddings", f"{name} has no token embeddings", "drop model.freeze_embeddings"
        )
    _PRETRAINED_CHECKS[name](cfg.model.pretrained, image_size)


def model_names(modality: Modality | None = None) -> list[str]:
    """Registered names (of one modality), sorted, for error messages and the CLI's choices."""
    return sorted(name for name in _BUILDERS if modality in (None, _MODALITIES[name]))


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    pretrained: str | None = None,
    layers: int | None = None,
    freeze_embeddings: bool = False,
) -> nn.Module:
    """Build backbone ``name`` for images of ``in_channels`` x ``image_size`` x ``image_size``, or a text
    encoder (``in_channels`` 0, ``image_size`` the tokens per sample) with its first ``layers`` layers and,
    with ``freeze_embeddings``, its token embeddings fixed.

    ``pretrained`` is None (random init), a local state-dict path, or ``"imagenet"`` (torchvision's hub,
    online only); families without published weights reject anything but None. Text encoders need a
    Hugging Face model folder or hub name.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ConfigError("model.name", f"unknown model {name!r}", f"use one of {model_names()}")
    text = _MODALITIES[name] == "text"
    extra = {"layers": layers, "freeze_embeddings": freeze_embeddings} if text else {}
    model = builder(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        pretrained=pretrained,
        **extra,
    )
    fc = getattr(model, "fc", None)
    feature_dim = getattr(model, "feature_dim", None)
    if not isinstance(fc, nn.Linear) or fc.in_features != feature_dim or fc.out_features != num_classes:
        raise TypeError(
            f"model {name!r} breaks the backbone contract: it needs an nn.Linear `fc` with "
            f"in_features == feature_dim ({feature_dim}) and out_features == num_classes ({num_classes})"
        )
    return model


def reject_pretrained(name: str, pretrained: str | None) -> None:
    """Fail loudly for families without published weights rather than silently training from scratch."""
    if pretrained is not None:
        raise ConfigError(
            "model.pretrained",
            f"{name} has no pretrained weights (got {pretrained!r})",
            "set model.pretrained to null, or use a torchvision ResNet (resnet18, resnet34, resnet50)",
        )
