"""Config: presets load, layering order, and every bad value fails with the field and the fix."""

import pytest

from raynoisy.cli import run
from raynoisy.config import load_config, preset_path
from raynoisy.errors import ConfigError


def test_preset_and_layering(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("optim: {lr: 0.2, epochs: 3}\nsplit: {val_per_class: 7}\n")
    cfg = load_config(
        "fashion-mnist",
        "glc",
        config_file=str(user),
        flags={"optim.epochs": 4, "run.output": str(tmp_path), "data.root": str(tmp_path)},
        overrides=["optim.lr=0.3", "method.params={}"],
    )
    assert cfg.model.name == "small-cnn"  # from the preset's _base.yaml
    assert cfg.split.val_per_class == 7  # from the user file
    assert cfg.optim.epochs == 4  # flag beats the file
    assert cfg.optim.lr == 0.3  # --set beats everything
    assert cfg.method.name == "glc"


def test_embedded_overlay_only_without_root(tmp_path):
    embedded = load_config("clothing1m", "ce", flags={"run.output": str(tmp_path)})
    real = load_config("clothing1m", "ce", flags={"run.output": str(tmp_path), "data.root": str(tmp_path)})
    assert embedded.model.name == "resnet18" and embedded.model.pretrained is None
    assert real.model.name == "resnet50" and real.model.pretrained == "imagenet"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"flags": {"noise.rate": 1.5}}, "noise.rate"),
        ({"flags": {"noise.type": "gaussian"}}, "noise.type"),
        ({"flags": {"noise.type": "matrix:/nonexistent/T.npy", "noise.rate": 0.0}}, "noise.type"),
        ({"flags": {"data.root": "/nonexistent/data"}}, "data.root"),
        ({"flags": {"optim.batch_size": 129, "scaling.workers": 2}}, "optim.batch_size"),
        ({"overrides": ["optim.lr=abc"]}, "optim.lr"),
        ({"overrides": ["optim.nosuchkey=1"]}, "optim.nosuchkey"),
        ({"overrides": ["method.params.alpha=1"]}, "method.params.alpha"),
        ({"flags": {"run.output": None}}, "run.output"),
    ],
)
def test_bad_values_name_the_field(tmp_path, kwargs, field):
    flags = {"run.output": str(tmp_path)} | kwargs.get("flags", {})
    with pytest.raises(ConfigError) as info:
        load_config("digits", "ce", flags=flags, overrides=kwargs.get("overrides"))
    assert info.value.field == field
    assert info.value.fix


def test_unknown_dataset_and_method():
    with pytest.raises(ConfigError, match=r"data\.dataset: unknown dataset"):
        load_config("mnist-9000", "ce", flags={"run.output": "x"})
    with pytest.raises(ConfigError, match=r"method\.name: unknown method"):
        load_config("digits", "magic", flags={"run.output": "x"})


def test_every_preset_validates(tmp_path):
    from raynoisy.config import presets_dir

    for path in presets_dir().glob("*/*.yaml"):
        if path.name.startswith("_"):
            continue
        dataset, method = path.parent.name, path.stem
        flags = {"run.output": str(tmp_path)}
        if dataset not in ("digits", "clothing1m"):
            flags["data.root"] = str(tmp_path)
        cfg = load_config(dataset, method, flags=flags)
        assert cfg.data.dataset == dataset and cfg.method.name == method
        assert preset_path(dataset, method) == path


def test_cli_exit_code_2_and_one_line(tmp_path, capsys):
    code = run(
        ["train", "--dataset", "digits", "--method", "ce", "--noise-rate", "2", "--output", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "noise.rate" in err and "[0" in err


def test_data_dependent_error_before_ray(tmp_path, capsys):
    # More clean samples per class than digits has (~180 per class): fails in the driver, before Ray starts.
    code = run(
        [
            "train",
            "--dataset",
            "digits",
            "--method",
            "glc",
            "--clean-per-class",
            "500",
            "--output",
            str(tmp_path),
            "--set",
            f"data.shard_root={tmp_path}/shards",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "split.clean_per_class" in err and "at most" in err
    assert not (tmp_path / "ray_results").exists()


def test_method_checks_against_the_rest_of_the_config_before_ray(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(
            "digits",
            "metalabelnet",
            flags={"run.output": str(tmp_path), "optim.epochs": 3},
            overrides=["method.params.warmup_epochs=3"],
        )
    assert info.value.field == "method.params.warmup_epochs"
