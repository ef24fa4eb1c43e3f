"""Backbone contract: shapes, features, double backward, pretrained loading, registry errors, determinism."""

from __future__ import annotations

import copy
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.func import functional_call

from raynoisy.config import Config
from raynoisy.errors import ConfigError
from raynoisy.models import build_model, check_config, model_names, register_model, registry

FEATURE_DIM = {
    "small-cnn": 128,
    "resnet20": 64,
    "resnet32": 64,
    "resnet44": 64,
    "resnet56": 64,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
}


def _build(name: str, *, size: int, channels: int = 3, classes: int = 10, pretrained: str | None = None):
    return build_model(
        name, num_classes=classes, in_channels=channels, image_size=size, pretrained=pretrained
    )


def test_every_backbone_is_registered() -> None:
    assert set(FEATURE_DIM) <= set(model_names())
    assert model_names() == sorted(model_names())


@pytest.mark.parametrize(
    ("name", "size", "channels", "batch"),
    [
        ("small-cnn", 8, 1, 3),
        ("small-cnn", 28, 1, 3),
        ("small-cnn", 32, 3, 2),
        ("small-cnn", 7, 1, 2),
        ("resnet32", 8, 1, 2),
        ("resnet32", 28, 1, 2),
        ("resnet32", 32, 3, 2),
        ("resnet20", 32, 3, 2),
        ("resnet18", 8, 1, 2),
        ("resnet18", 32, 3, 2),
        ("resnet18", 64, 3, 2),
        ("resnet34", 28, 3, 2),
        ("resnet50", 64, 3, 1),
    ],
)
def test_forward_returns_logits_and_the_features_fc_reads(
    name: str, size: int, channels: int, batch: int
) -> None:
    torch.manual_seed(0)
    model = _build(name, size=size, channels=channels, classes=7)
    logits, features = model(torch.randn(batch, channels, size, size))
    assert model.feature_dim == FEATURE_DIM[name]
    assert isinstance(model.fc, nn.Linear)
    assert (model.fc.in_features, model.fc.out_features) == (model.feature_dim, 7)
    assert logits.shape == (batch, 7)
    assert features.shape == (batch, model.feature_dim)
    # The features are the fc input, not some other layer's output.
    torch.testing.assert_close(model.fc(features), logits)
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())


def test_torchvision_resnet_keeps_the_imagenet_stem_from_64_px() -> None:
    small, large = _build("resnet18", size=32), _build("resnet18", size=64)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize(("name", "size"), [("small-cnn", 8), ("resnet32", 8), ("resnet18", 8)])
def test_second_order_gradients_through_functional_call(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = _build(name, size=size, classes=4)
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    logits, _ = functional_call(model, (params, buffers), (x,))
    grads = torch.autograd.grad(F.cross_entropy(logits, y), list(params.values()), create_graph=True)
    grad_norm = sum(g.pow(2).sum() for g in grads)
    second = torch.autograd.grad(grad_norm, list(params.values()))
    assert all(torch.isfinite(g).all() for g in second)
    assert sum(g.abs().sum() for g in second) > 0
    assert second[0].abs().sum() > 0  # reaches the first convolution, through the whole network


@pytest.mark.parametrize("name", ["small-cnn", "resnet32", "resnet18"])
def test_models_pickle(name: str) -> None:
    """Ray ships models between processes by pickling them."""
    model = _build(name, size=8).eval()
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))


def test_same_seed_gives_identical_parameters_and_buffers() -> None:
    for name in ("small-cnn", "resnet32", "resnet18", "resnet50"):
        states = []
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            states.append(_build(name, size=64 if name == "resnet50" else 32).state_dict())
        assert states[0].keys() == states[1].keys()
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), name
        assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0]), name


def test_unknown_model_is_a_config_error_listing_the_names() -> None:
    with pytest.raises(ConfigError) as info:
        _build("resnet-nope", size=32)
    assert info.value.field == "model.name"
    assert "'resnet-nope'" in info.value.problem
    assert "resnet32" in info.value.fix and "small-cnn" in info.value.fix


def test_register_model_rejects_duplicates_and_contract_breakers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    monkeypatch.setattr(registry, "_PRETRAINED_CHECKS", dict(registry._PRETRAINED_CHECKS))

    class NoFeatureDim(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.fc = nn.Linear(5, num_classes)

    @register_model("toy")
    def toy(*, num_classes: int, in_channels: int, image_size: int, pretrained: str | None) -> nn.Module:
        return NoFeatureDim(num_classes)

    assert "toy" in model_names()
    with pytest.raises(TypeError, match="feature_dim"):
        _build("toy", size=8)
    cfg = _model_config("toy")
    check_config(cfg, 8)
    cfg.model.pretrained = "/some/weights.pt"
    with pytest.raises(ConfigError) as info:  # registered without a check: no pretrained weights at all
        check_config(cfg, 8)
    assert info.value.field == "model.pretrained" and "toy" in info.value.problem
    with pytest.raises(ValueError, match="already registered"):
        register_model("toy")(toy)


@pytest.mark.parametrize("name", ["small-cnn", "resnet32"])
def test_models_without_published_weights_reject_pretrained(name: str, tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.touch()
    with pytest.raises(ConfigError) as info:
        _build(name, size=32, pretrained=str(weights))
    assert info.value.field == "model.pretrained"
    with pytest.raises(ConfigError) as info:  # and the config check refuses it before Ray starts
        check_config(_model_config(name, str(weights)), 32)
    assert info.value.field == "model.pretrained"


def _model_config(name: str, pretrained: str | None = None) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.pretrained = name, pretrained
    return cfg


def test_config_check_refuses_what_no_worker_could_build(
    resnet18_file: tuple[Path, torchvision.models.ResNet], tmp_path: Path
) -> None:
    """``models.check_config`` (the preflight's model part) fails on what ``build_model`` would fail on."""
    for name in ("small-cnn", "resnet32", "resnet18"):
        check_config(_model_config(name), 32)
    with pytest.raises(ConfigError) as info:
        check_config(_model_config("resnet-nope"), 32)
    assert info.value.field == "model.name" and "resnet32" in info.value.fix
    check_config(_model_config("resnet18", str(resnet18_file[0])), 64)
    for pretrained, size, problem in [
        (str(tmp_path / "missing.pth"), 64, "does not exist"),
        (str(resnet18_file[0]), 32, "32 px"),  # ImageNet weights do not fit the small-image stem
    ]:
        with pytest.raises(ConfigError, match=problem) as info:
            check_config(_model_config("resnet18", pretrained), size)
        assert info.value.field == "model.pretrained"


def test_config_check_of_imagenet_weights_needs_the_hub_cache_or_a_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    asked: list[str] = []

    def offline(request: object, *args: object, **kwargs: object) -> None:
        asked.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet50_Weights.DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cfg = _model_config("resnet50", "imagenet")
    with pytest.raises(ConfigError) as info:
        check_config(cfg, 224)
    assert info.value.field == "model.pretrained" and str(cached) in info.value.problem
    assert "model.pretrained=null" in info.value.fix and asked == [url]
    cached.parent.mkdir(parents=True)
    cached.touch()
    check_config(cfg, 224)  # in the hub cache: no network needed
    assert asked == [url]


# --- pretrained torchvision weights from a local file -------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torchvision.models.ResNet]:
    """A state dict saved from torchvision's own resnet18 (1000-class fc), and that model."""
    torch.manual_seed(123)
    reference = torchvision.models.resnet18().eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    return path, reference


@pytest.mark.parametrize("wrapping", ["plain", "state_dict", "model", "ddp"])
def test_local_state_dict_loads_all_but_fc(
    wrapping: str, resnet18_file: tuple[Path, torchvision.models.ResNet], tmp_path: Path
) -> None:
    path, reference = resnet18_file
    state = reference.state_dict()
    if wrapping != "plain":
        path = tmp_path / "wrapped.pth"
        if wrapping == "ddp":
            torch.save({f"module.{k}": v for k, v in state.items()}, path)
        else:
            torch.save({wrapping: state, "epoch": 3}, path)
    torch.manual_seed(0)
    model = _build("resnet18", size=64, classes=14, pretrained=str(path)).eval()
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (14, 512) and torch.all(model.fc.bias == 0)
    x = torch.randn(2, 3, 64, 64)
    headless = copy.deepcopy(reference)
    headless.fc = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1], headless(x))


@pytest.mark.parametrize("channels", [1, 4])
def test_pretrained_first_layer_is_adapted_to_the_channel_count(
    channels: int, resnet18_file: tuple[Path, torchvision.models.ResNet]
) -> None:
    path, reference = resnet18_file
    model = _build("resnet18", size=64, channels=channels, pretrained=str(path))
    grey = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ours = model.conv1(grey.expand(-1, channels, -1, -1))
        theirs = reference.conv1(grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_mismatched_weights_name_the_file(resnet18_file: tuple[Path, torchvision.models.ResNet]) -> None:
    path, _ = resnet18_file
    with pytest.raises(ConfigError) as info:
        _build("resnet34", size=64, pretrained=str(path))
    assert info.value.field == "model.pretrained"
    assert str(path) in str(info.value)
    assert "missing" in info.value.problem and "layer1.2.conv1.weight" in info.value.problem
    assert "resnet34" in info.value.fix


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_unreadable_or_missing_weights_file_names_the_file(content: bytes | None, tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        _build("resnet18", size=64, pretrained=str(path))
    assert str(path) in info.value.problem


def test_pretrained_weights_do_not_fit_the_small_image_stem(
    resnet18_file: tuple[Path, torchvision.models.ResNet],
) -> None:
    with pytest.raises(ConfigError, match="64 px"):
        _build("resnet18", size=32, pretrained=str(resnet18_file[0]))


def test_imagenet_weights_come_from_the_torchvision_hub(
    monkeypatch: pytest.MonkeyPatch, resnet18_file: tuple[Path, torchvision.models.ResNet]
) -> None:
    path, reference = resnet18_file
    urls: list[str] = []

    def fake_hub(url: str, **kwargs: object) -> dict[str, torch.Tensor]:
        urls.append(url)
        return torch.load(path, weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    model = _build("resnet18", size=224, pretrained="imagenet")
    assert urls == [torchvision.models.ResNet18_Weights.DEFAULT.url]
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight, rtol=0, atol=0)


def test_offline_imagenet_download_says_to_pass_a_local_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, **kwargs: object) -> dict[str, torch.Tensor]:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as info:
        _build("resnet18", size=224, pretrained="imagenet")
    assert "no route to host" in info.value.problem
    assert "local path" in info.value.fix
