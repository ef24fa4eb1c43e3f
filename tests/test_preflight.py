"""Preflight: a run that cannot work fails in the driver's process, in seconds, with one line naming the
field and the fix, before Ray starts (and before Ray Train is even imported)."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray

from raynoisy.cli import run
from raynoisy.config import Config, preset_path
from raynoisy.data.miniature import build_miniature_clothing1m
from raynoisy.errors import ConfigError
from raynoisy.methods import method_names
from raynoisy.train.preflight import resolve_config


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything starts Ray or imports Ray Train (or the modules that import it).

    Importing is checked in this process, cheaply: every ``ray.train`` module is blocked (an import raises
    ImportError), and ``raynoisy.train.*`` modules other than the preflight are taken out of
    ``sys.modules`` for the test, so one the CLI imports runs its imports again and hits the block even
    when another test imported it already. ``ray.is_initialized()`` must be False afterwards unless a Ray
    test of the same session had started the shared cluster before (then the blocks above still hold).
    """
    was_initialized = ray.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: Ray started although the preflight should have refused")

    monkeypatch.setattr(ray, "init", refuse)
    for name in [name for name in sys.modules if name == "ray.train" or name.startswith("ray.train.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "ray.train", None)
    keep = {"raynoisy.train", "raynoisy.train.preflight"}
    for name in [name for name in sys.modules if name.startswith("raynoisy.train.") and name not in keep]:
        monkeypatch.delitem(sys.modules, name)
    yield
    assert ray.is_initialized() is was_initialized


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache, and no network even where this machine has one."""
    calls: list[str] = []

    def no_network(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("no network in this test")

    hub_home = tmp_path / "torch_home"
    hub_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(hub_home))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return hub_home, calls


@pytest.fixture(scope="module")
def clothing1m_tree(tmp_path_factory) -> Path:
    """The official Clothing1M layout, as small as the builder allows (the preflight only needs the root)."""
    return build_miniature_clothing1m(
        tmp_path_factory.mktemp("clothing1m"), images_per_class=58, image_size=16
    )


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], float]:
    """Exit code, stderr lines and seconds of one ``raynoisy`` call, in this process."""
    start = time.monotonic()
    code = run(argv)
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    return code, err.splitlines(), seconds


def test_clothing1m_imagenet_weights_offline_fail_fast_naming_the_fix(
    clothing1m_tree, offline, no_ray, tmp_path, capsys
):
    hub_home, calls = offline
    argv = ["train", "--dataset", "clothing1m", "--data-root", str(clothing1m_tree), "--method", "ce"]
    code, lines, seconds = run_cli([*argv, "--output", str(tmp_path / "out")], capsys)
    assert code == 2
    assert seconds < 30
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("raynoisy: error: model.pretrained: ")
    assert str(hub_home) in line  # the hub cache it looked in is the (empty) one of this test
    assert "resnet50" in line
    assert "--set model.pretrained=PATH" in line and "--set model.pretrained=null" in line  # the fix
    assert calls and all("resnet50" in url for url in calls)  # it tried the download URL before refusing


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [("--lr", "nan", "optim.lr"), ("--lr", "inf", "optim.lr"), ("--noise-rate", "nan", "noise.rate")],
)
def test_non_finite_numbers_are_refused(flag, value, field, no_ray, tmp_path, capsys):
    argv = ["train", "--dataset", "digits", "--method", "ce", "--output", str(tmp_path), f"{flag}={value}"]
    code, lines, _ = run_cli(argv, capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"raynoisy: error: {field}: ") and "finite" in lines[0]


def test_unwritable_output_is_refused(no_ray, tmp_path, capsys):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    # Tests run as root, which chmod does not stop: a folder below a regular file cannot exist for anyone.
    argv = ["train", "--dataset", "digits", "--method", "ce", "--output", str(a_file / "run")]
    code, lines, _ = run_cli(argv, capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("raynoisy: error: run.output: ") and str(a_file) in lines[0]
    assert "--output" in lines[0]  # the fix


def test_mlc_needs_two_samples_per_worker(no_ray, tmp_path, capsys):
    argv = ["train", "--dataset", "digits", "--method", "mlc", "--output", str(tmp_path)]
    code, lines, _ = run_cli([*argv, "--batch-size", "2", "--workers", "2"], capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("raynoisy: error: optim.batch_size: ") and "--batch-size 4" in lines[0]
    with pytest.raises(ConfigError) as info:
        resolve_config(
            "digits", "mlc", flags={"run.output": str(tmp_path), "optim.batch_size": 2, "scaling.workers": 2}
        )
    assert info.value.field == "optim.batch_size"


TRUSTED_METHODS = ("ce-clean", "ce-all", "glc", "mwnet", "mlc", "metalabelnet")


def test_no_trusted_set_refuses_the_methods_that_need_one_before_ray(no_ray, tmp_path, capsys):
    argv = ["train", "--dataset", "digits", "--method", "glc", "--output", str(tmp_path)]
    code, lines, seconds = run_cli([*argv, "--clean-per-class", "0"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("raynoisy: error: split.clean_per_class: method 'glc' ")
    assert "--clean-per-class 1 or more" in lines[0] and seconds < 30
    flags = {"run.output": str(tmp_path), "split.clean_per_class": 0}
    for method in TRUSTED_METHODS:
        with pytest.raises(ConfigError, match=f"method '{method}' trains on a trusted set") as info:
            resolve_config("digits", method, flags=flags)
        assert info.value.field == "split.clean_per_class"
        assert "ce, mixnn, mlnt" in info.value.fix
    for method in ("ce", "mixnn", "mlnt"):
        assert resolve_config("digits", method, flags=flags).split.clean_per_class == 0
    # Clothing1M ships a trusted set (clean_train): 0 leaves it unused, so the same refusal.
    with pytest.raises(ConfigError, match="method 'mlc'"):
        resolve_config("clothing1m", "mlc", flags=flags)


WEBVISION_BASE = {
    # data set: (image_size, model, epochs, batch_size, lr, milestones) from its _base.yaml
    "webvision-mini": (224, "resnet50", 80, 32, 0.01, [40]),
    "webvision": (224, "resnet50", 80, 256, 0.1, [40, 60]),
}


@pytest.mark.parametrize(
    ("dataset", "method"),
    [(d, m) for d in sorted(WEBVISION_BASE) for m in method_names() if not preset_path(d, m).exists()],
)
def test_methods_without_a_preset_start_from_the_data_set_base(dataset, method, no_ray, tmp_path):
    cfg = resolve_config(
        dataset, method, flags={"data.root": str(tmp_path), "run.output": str(tmp_path / "out")}
    )
    assert isinstance(cfg, Config)
    assert cfg.data.dataset == dataset and cfg.method.name == method
    assert cfg.method.params == {}  # the method's own defaults
    image_size, model, epochs, batch_size, lr, milestones = WEBVISION_BASE[dataset]
    assert (cfg.data.image_size, cfg.model.name, cfg.model.pretrained) == (image_size, model, None)
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.lr) == (epochs, batch_size, lr)
    assert cfg.optim.milestones == milestones and cfg.noise.type == "none"


@pytest.mark.parametrize(
    ("override", "field"),
    [('data.root="a\\nb"', "data.root"), ('method.params={"a\\nb": 1}', "method.params.a")],
)
def test_a_newline_in_a_value_or_key_still_prints_one_line(override, field, no_ray, tmp_path, capsys):
    argv = ["train", "--dataset", "digits", "--method", "mlc", "--output", str(tmp_path), "--set", override]
    code, lines, _ = run_cli(argv, capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"raynoisy: error: {field}") and "a\\nb" in lines[0]
