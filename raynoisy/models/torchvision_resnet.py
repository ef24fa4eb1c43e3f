"""torchvision's ResNets (``resnet18``, ``resnet34``, ``resnet50``) behind the backbone contract.

The models subclass torchvision's ``ResNet`` so their state-dict keys are torchvision's: a checkpoint saved
from ``torchvision.models.resnet50()`` (or the ImageNet weights of the Clothing1M and WebVision
experiments) loads without renaming. Differences from torchvision, each needed by the methods:

- ``forward`` returns ``(logits, features)`` with the 512-d (18/34) or 2048-d (50) pooled features.
- ``fc`` is a new ``Linear(feature_dim, num_classes)`` with xavier-normal weight and zero bias, as MLC's
  Clothing1M model; the checkpoint's 1000-class ``fc`` is never loaded.
- The ReLUs are not in place, for double backward through ``functional_call``. torchvision's blocks still
  add the shortcut in place (``out += identity``), which is safe: it writes into a BatchNorm output, which
  autograd does not save.
- Images smaller than ``SMALL_IMAGE_SIZE`` get a 3x3 stride-1 stem without max-pool (the usual CIFAR
  variant). The ImageNet stem shrinks the grid 4x before ``layer1``, so a 32 px image would reach ``layer4``
  as a 1x1 grid and train markedly worse. ImageNet weights do not fit that stem, so asking for both is an
  error rather than a silently re-initialised first layer.
- ``in_channels != 3``: a new first convolution; with pretrained weights it is the RGB kernel averaged over
  colour and spread over the new channels (scaled by 3 / in_channels), so a grey image repeated over the
  input channels gives exactly the response the RGB network gives to that grey image in colour.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from raynoisy.config import IMAGENET_WEIGHTS, user_path
from raynoisy.errors import ConfigError
from raynoisy.models.registry import register_model

SMALL_IMAGE_SIZE = 64

_STEM_WIDTH = 64


class TorchvisionResNet(ResNet):
    """torchvision ResNet returning ``(logits, features)``; see the module docstring for the changes."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int,
        in_channels: int,
        small_stem: bool,
    ) -> None:
        super().__init__(block, layers)
        self.feature_dim = 512 * block.expansion
        if small_stem or in_channels != 3:
            kernel, stride, padding = (3, 1, 1) if small_stem else (7, 2, 3)
            self.conv1 = nn.Conv2d(
                in_channels, _STEM_WIDTH, kernel, stride=stride, padding=padding, bias=False
            )
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        if small_stem:
            self.maxpool = nn.Identity()
        self.fc = nn.Linear(self.feature_dim, num_classes)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        for module in self.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        features = torch.flatten(self.avgpool(x), 1)
        return self.fc(features), features


def adapt_input_channels(weight: Tensor, in_channels: int) -> Tensor:
    """Turn an RGB first-layer kernel ``[out, 3, k, k]`` into one for ``in_channels`` inputs.

    The kernel is averaged over colour, copied to every input channel and scaled by ``3 / in_channels``;
    for one channel that is the sum over colour (timm does the same).
    """
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (3.0 / in_channels)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The state dict in ``path``: plain or under a ``"state_dict"``/``"model"`` key; DDP prefix dropped."""
    if not path.is_file():
        raise ConfigError(
            "model.pretrained", f"{path} does not exist", "pass a local torchvision state dict file"
        )
    try:
        # weights_only: a weights file from the internet must not be able to run code when unpickled.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            "model.pretrained",
            f"{path} could not be read as a torch state dict ({type(err).__name__}: {err})",
            "save the weights with torch.save(model.state_dict(), path)",
        ) from err
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ConfigError(
            "model.pretrained",
            f"{path} holds no state dict (a mapping from parameter names to tensors)",
            "save the weights with torch.save(model.state_dict(), path)",
        )
    if loaded and all(key.startswith("module.") for key in loaded):
        return {key.removeprefix("module."): value for key, value in loaded.items()}
    return dict(loaded)


def _hub_file(weights: type[WeightsEnum]) -> Path:
    """Where ``torch.hub`` caches the ImageNet weights: present there, they load with no network."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.DEFAULT.url.rsplit("/", 1)[-1]


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url`` answers a HEAD request within ``timeout`` seconds (False offline or behind a wall)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _check_pretrained(name: str, weights: type[WeightsEnum], pretrained: str | None, image_size: int) -> None:
    """Before Ray starts: the weights ``model.pretrained`` names can be had and fit the stem."""
    if pretrained is None:
        return
    if image_size < SMALL_IMAGE_SIZE:
        raise ConfigError(
            "model.pretrained",
            f"{name} uses a 3x3 stem for {image_size} px images, which ImageNet weights do not fit",
            f"resize the images to at least {SMALL_IMAGE_SIZE} px, or set model.pretrained to null",
        )
    if pretrained != IMAGENET_WEIGHTS:
        if not user_path(pretrained, "model.pretrained").is_file():
            raise ConfigError(
                "model.pretrained", f"{pretrained} does not exist", "pass a local torchvision state dict file"
            )
        return
    cached = _hub_file(weights)
    if cached.is_file() or _reachable(weights.DEFAULT.url):
        return
    raise ConfigError(
        "model.pretrained",
        f"torchvision's ImageNet weights for {name} are not in the hub cache ({cached}) and cannot be "
        "downloaded from here",
        f"copy {cached.name} from a machine with internet access and pass --set model.pretrained=PATH "
        f"(or put it at {cached}), or train from scratch with --set model.pretrained=null",
    )


def _fetch_imagenet(name: str, weights: type[WeightsEnum]) -> dict[str, Tensor]:
    """torchvision's default ImageNet weights through the hub cache (``$TORCH_HOME/hub/checkpoints``)."""
    try:
        return torch.hub.load_state_dict_from_url(
            weights.DEFAULT.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError) as err:
        raise ConfigError(
            "model.pretrained",
            f"could not download torchvision's ImageNet weights for {name} ({err})",
            f"pass a local path to a torchvision {name} state dict instead (the hub file "
            f"{weights.DEFAULT.url.rsplit('/', 1)[-1]} copied from a machine with internet access works)",
        ) from err


def _load_backbone(model: TorchvisionResNet, name: str, state: Mapping[str, Tensor], source: str) -> None:
    """Load everything but ``fc``; every other tensor must be present with the right shape."""
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.shape[1] == 3 and model.conv1.in_channels != 3:
        state["conv1.weight"] = adapt_input_channels(conv1, model.conv1.in_channels)
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith("fc.")}
    # Checkpoints from before BatchNorm counted batches lack num_batches_tracked; BatchNorm fills it in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]
    if problems:
        raise ConfigError(
            "model.pretrained",
            f"{source} does not fit {name}: {'; '.join(problems)}",
            f"pass a state dict saved from torchvision's {name}",
        )
    model.load_state_dict(state, strict=False)


_VARIANTS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], ResNet18_Weights),
    "resnet34": (BasicBlock, [3, 4, 6, 3], ResNet34_Weights),
    "resnet50": (Bottleneck, [3, 4, 6, 3], ResNet50_Weights),
}


def _register(name: str) -> None:
    block, layers, weights = _VARIANTS[name]

    def check(pretrained: str | None, image_size: int) -> None:
        _check_pretrained(name, weights, pretrained, image_size)

    @register_model(name, check_pretrained=check)
    def build(
        *, num_classes: int, in_channels: int, image_size: int, pretrained: str | None
    ) -> TorchvisionResNet:
        small_stem = image_size < SMALL_IMAGE_SIZE
        if pretrained is not None and small_stem:
            check(pretrained, image_size)  # refuses: ImageNet weights do not fit the small stem
        # Weights are read before the network is built, so a bad file or no network fails fast.
        state, source = None, ""
        if pretrained == IMAGENET_WEIGHTS:
            state, source = _fetch_imagenet(name, weights), f"torchvision's {weights.DEFAULT}"
        elif pretrained is not None:
            path = Path(pretrained).expanduser()
            state, source = _read_state_dict(path), str(path)
        model = TorchvisionResNet(block, layers, num_classes, in_channels, small_stem)
        if state is not None:
            _load_backbone(model, name, state, source)
        return model


for _name in _VARIANTS:
    _register(_name)
