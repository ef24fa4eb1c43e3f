"""Config: presets load, layering order, and every bad value fails with the field and the fix.

``load_config`` builds the config and checks the schema; ``resolve_config`` (the preflight) also checks what
the registries decide (data set and noise, model, method and its params, the output folder).
"""

import urllib.request

import pytest
import torch
import torch.hub
import torchvision

from raynoisy.cli import run
from raynoisy.config import default_shard_root, load_config, preset_path
from raynoisy.errors import ConfigError
from raynoisy.train.preflight import resolve_config


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
    resolved = resolve_config(
        "fashion-mnist",
        "glc",
        config_file=str(user),
        flags={"optim.epochs": 4, "run.output": str(tmp_path), "data.root": str(tmp_path)},
        overrides=["optim.lr=0.3", "method.params={}"],
    )
    assert resolved.to_dict() == cfg.to_dict()  # the full check layers the same way and changes nothing


def test_local_paths_are_made_absolute_where_the_command_runs(tmp_path, monkeypatch):
    """Ray Train workers and Tune trials run in folders of their own: every local path is absolute by then."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "imagenet").mkdir()  # a folder named like torchvision's weights does not replace them
    relative = ["data.root=data", "data.shard_root=./shards", "run.storage_path=../elsewhere"]
    cfg = load_config(
        "fashion-mnist",
        "ce",
        flags={"run.output": "out/ce", "noise.type": "matrix:T.csv", "model.pretrained": "weights"},
        overrides=relative,
    )
    assert (cfg.data.root, cfg.data.shard_root) == (str(tmp_path / "data"), str(tmp_path / "shards"))
    assert cfg.run.output == str(tmp_path / "out" / "ce")
    assert cfg.run.storage_path == str(tmp_path.parent / "elsewhere")
    assert cfg.noise.type == f"matrix:{tmp_path / 'T.csv'}" and cfg.model.pretrained == str(
        tmp_path / "weights"
    )
    monkeypatch.setenv("RAYNOISY_SHARD_ROOT", "cache/shards")  # the default root, from the environment
    assert default_shard_root() == str(tmp_path / "cache" / "shards")
    # URIs, weight names and a pretrained name that is no local path stay as written.
    kept = ["data.shard_root=s3://bucket/shards", "run.storage_path=gs://bucket/runs"]
    for pretrained in ("imagenet", "sentence-transformers/all-MiniLM-L6-v2"):
        flags = {"model.pretrained": pretrained, "run.output": "out"}
        cfg = load_config("fashion-mnist", "ce", flags=flags, overrides=kept)
        assert (cfg.data.shard_root, cfg.run.storage_path) == ("s3://bucket/shards", "gs://bucket/runs")
        assert cfg.model.pretrained == pretrained


def test_embedded_overlay_only_without_root(tmp_path):
    embedded = load_config("clothing1m", "ce", flags={"run.output": str(tmp_path)})
    real = load_config("clothing1m", "ce", flags={"run.output": str(tmp_path), "data.root": str(tmp_path)})
    assert embedded.model.name == "resnet18" and embedded.model.pretrained is None
    assert real.model.name == "resnet50" and real.model.pretrained == "imagenet"


@pytest.mark.parametrize(
    ("kwargs", "field", "schema"),
    [
        ({"flags": {"noise.rate": 1.5}}, "noise.rate", False),
        ({"flags": {"noise.type": "gaussian"}}, "noise.type", False),
        ({"flags": {"noise.type": "matrix:/nonexistent/T.npy", "noise.rate": 0.0}}, "noise.type", False),
        ({"flags": {"data.root": "/nonexistent/data"}}, "data.root", False),
        ({"flags": {"optim.batch_size": 129, "scaling.workers": 2}}, "optim.batch_size", True),
        ({"overrides": ["optim.lr=abc"]}, "optim.lr", True),
        ({"overrides": ["optim.nosuchkey=1"]}, "optim.nosuchkey", True),
        ({"overrides": ["method.params.alpha=1"]}, "method.params.alpha", False),
        ({"overrides": ["model.name=resnet-nope"]}, "model.name", False),
        ({"overrides": ["model.pretrained=/nonexistent/w.pt"]}, "model.pretrained", False),
        ({"flags": {"run.output": None}}, "run.output", True),
    ],
)
def test_bad_values_name_the_field(tmp_path, kwargs, field, schema):
    """Every bad value fails ``resolve_config`` naming the field and the fix; the schema's own ones already
    fail ``load_config``, the others only the full check."""
    flags = {"run.output": str(tmp_path)} | kwargs.get("flags", {})
    with pytest.raises(ConfigError) as info:
        resolve_config("digits", "ce", flags=flags, overrides=kwargs.get("overrides"))
    assert info.value.field == field
    assert info.value.fix
    if schema:
        with pytest.raises(ConfigError) as info:
            load_config("digits", "ce", flags=flags, overrides=kwargs.get("overrides"))
        assert info.value.field == field
    else:
        load_config("digits", "ce", flags=flags, overrides=kwargs.get("overrides"))


def test_clean_per_class_zero_means_no_trusted_set_and_negative_is_refused(tmp_path):
    flags = {"run.output": str(tmp_path)}
    cfg = load_config("digits", "mixnn", flags=flags | {"split.clean_per_class": 0})
    assert cfg.split.clean_per_class == 0
    with pytest.raises(ConfigError) as info:
        load_config("digits", "mixnn", flags=flags | {"split.clean_per_class": -1})
    assert info.value.field == "split.clean_per_class" and "--clean-per-class 0" in info.value.fix
    with pytest.raises(ConfigError) as info:  # 0 is special to the trusted set only
        load_config("digits", "ce", flags=flags | {"split.val_per_class": 0})
    assert info.value.field == "split.val_per_class"


def test_precision_is_fp32_or_bf16_mixed_and_fp16_is_refused_with_the_reason(tmp_path, capsys):
    flags = {"run.output": str(tmp_path)}
    assert load_config("digits", "mlc", flags=flags).scaling.precision == "fp32"
    mixed = load_config("digits", "mlc", flags=flags | {"scaling.precision": "bf16-mixed"})
    assert mixed.scaling.precision == "bf16-mixed"
    for bad, reason in (("fp16", "loss scaling"), ("fp16-mixed", "loss scaling"), ("bf16", "use fp32 or")):
        with pytest.raises(ConfigError) as info:
            load_config("digits", "mlc", flags=flags | {"scaling.precision": bad})
        assert info.value.field == "scaling.precision" and reason in info.value.fix
    code = run(
        ["train", "--dataset", "digits", "--method", "ce", "--precision", "fp16", "--output", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "scaling.precision" in err and "loss scaling" in err


def test_bf16_mixed_on_a_gpu_without_bfloat16_is_refused_in_the_worker(monkeypatch):
    from raynoisy.train.precision import check_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    check_device("fp32", torch.device("cuda"))
    check_device("bf16-mixed", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"scaling\.precision: .*this worker has Tesla V100") as info:
        check_device("bf16-mixed", torch.device("cuda"))
    assert info.value.fix == "set scaling.precision=fp32"


def test_unknown_dataset_and_method(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.dataset: unknown dataset"):
        resolve_config("mnist-9000", "ce", flags={"run.output": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"method\.name: unknown method"):
        resolve_config("digits", "magic", flags={"run.output": str(tmp_path)})


def test_every_preset_validates(tmp_path, monkeypatch):
    """Every shipped preset passes the full check; Clothing1M's also with a data root, where it trains an
    ImageNet-pretrained ResNet-50 (the weights are put in an empty hub cache: this test needs no network),
    the text presets with BERT-base put in an empty Hugging Face cache, and the embedded AG News."""
    import huggingface_hub

    from raynoisy.config import presets_dir

    def no_network(*args, **kwargs):
        raise AssertionError("the preset check went online")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    revision = "0" * 40
    bert = tmp_path / "hf" / "models--bert-base-uncased"
    (bert / "snapshots" / revision).mkdir(parents=True)
    (bert / "snapshots" / revision / "config.json").write_text("{}")
    (bert / "refs").mkdir()
    (bert / "refs" / "main").write_text(revision)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("resnet18", "resnet34", "resnet50"):
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.touch()
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    presets = [p for p in sorted(presets_dir().glob("*/*.yaml")) if not p.name.startswith("_")]
    checked = []
    for path in presets:
        dataset, method = path.parent.name, path.stem
        roots = [str(tmp_path)] if dataset != "digits" else [None]
        if dataset in ("clothing1m", "ag-news"):
            roots.append(None)  # the embedded miniature
        for root in roots:
            flags = {"run.output": str(tmp_path / "out"), "data.root": root}
            cfg = resolve_config(dataset, method, flags=flags)
            assert cfg.data.dataset == dataset and cfg.method.name == method
            assert preset_path(dataset, method) == path
            checked.append((cfg.model.name, cfg.model.pretrained))
    embedded = sum(p.parent.name in ("clothing1m", "ag-news") for p in presets)
    assert len(checked) == len(presets) + embedded
    assert ("resnet50", "imagenet") in checked and ("bert", "bert-base-uncased") in checked


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
        resolve_config(
            "digits",
            "metalabelnet",
            flags={"run.output": str(tmp_path), "optim.epochs": 3},
            overrides=["method.params.warmup_epochs=3"],
        )
    assert info.value.field == "method.params.warmup_epochs"
