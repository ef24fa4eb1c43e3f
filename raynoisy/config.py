"""One typed config per run: YAML presets shipped in the package, a user file, CLI flags, ``--set`` overrides.

Precedence (later wins): the preset ``configs/<dataset>/<method>.yaml`` (which may ``extends:`` a sibling
file), ``--config FILE.yaml``, the named CLI flags, then ``--set key.path=value``. Everything that can be
checked without reading the data is checked by ``validate`` before Ray starts; checks that need the data
(per-class counts, list files) run in the driver, also before Ray starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from raynoisy.errors import ConfigError

# Data sets that run without --data-root on a generated miniature copy in the official layout.
EMBEDDED_DATASETS = ("clothing1m",)


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str | None = None  # None: the source's embedded data, or an error if it has none
    options: dict = field(default_factory=dict)  # source-specific, e.g. text-table column names
    shard_root: str | None = None  # local path or pyarrow URI (s3://, gs://); None: ~/.cache/raynoisy/shards
    rows_per_shard: int = 4096
    image_size: int | None = None  # network input side; None: the source's default
    max_bad_fraction: float = 0.01  # unreadable samples tolerated before the run fails
    shuffle_buffer_rows: int = 1024  # Ray Data local shuffle buffer per worker


@dataclass
class NoiseConfig:
    type: str = "none"  # none | uniform | symmetric | flip | pair | matrix:PATH
    rate: float = 0.0


@dataclass
class SplitConfig:
    clean_per_class: int | None = None
    clean_fraction: float | None = None
    val_per_class: int | None = None
    test_fraction: float = 0.2
    train_subset: int | None = None


@dataclass
class ModelConfig:
    name: str = "small-cnn"
    pretrained: str | None = None  # local weights path, or "imagenet" for torchvision's hub (online only)


@dataclass
class MethodConfig:
    name: str = "ce"
    params: dict = field(default_factory=dict)  # validated against the method's own params dataclass


@dataclass
class OptimConfig:
    epochs: int = 10
    batch_size: int = 128  # global: split evenly across workers
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=list)  # epochs at which multistep multiplies lr by gamma
    gamma: float = 0.1


@dataclass
class ScalingConfig:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # None: share the node's CPUs with the Ray Data pipeline


@dataclass
class RunConfig:
    output: str | None = None
    seed: int = 0
    name: str | None = None  # Ray Train run name; the same name + storage resumes the run
    storage_path: str | None = None  # None: <output>/ray_results; use shared storage on a multi-node cluster
    max_failures: int = 3
    keep_checkpoints: int = 2
    log_every_steps: int = 50
    tensorboard: bool = True
    fail_once_at_epoch: int | None = None  # fault-injection drill: rank 1 (or 0) dies once at this epoch


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def coerce_field(value: Any, hint: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a ConfigError naming the field."""
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(path, "must not be empty", f"give {path} a value")
    try:
        if hint is bool or text == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if text.startswith("int") or hint is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError(value)
            return int(float(value))
        if text.startswith("float") or hint is float:
            return float(value)
        if text.startswith("str") or hint is str:
            return str(value)
        if text.startswith("list"):
            if not isinstance(value, list | tuple):
                raise ValueError(value)
            return [int(v) for v in value] if "int" in text else list(value)
        if text.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(path, f"{value!r} is not a valid {text}", f"set {path} to a {text}") from None
    return value


def _merge_into(obj: Any, values: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(path, "unknown config key", f"use one of {sorted(names)}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(path, "must be a mapping", f"write {path}: {{...}}")
            _merge_into(current, value, f"{path}.")
        elif key in ("options", "params") and isinstance(current, dict) and isinstance(value, dict):
            current.update(value)
        else:
            setattr(obj, key, coerce_field(value, hints[key], path))


def _read_yaml(path: Path, field_name: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(
            field_name, f"cannot read {path}: {exc.strerror}", "pass a readable YAML file"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(field_name, f"{path} is not valid YAML ({exc})", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(field_name, f"{path} must hold a mapping", "write key: value pairs")
    return data


def _resolve_extends(path: Path, field_name: str, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and the chain of files it ``extends:`` (relative to itself), base first."""
    if path in seen:
        raise ConfigError(field_name, f"{path} extends itself", "remove the cycle of extends:")
    data = _read_yaml(path, field_name)
    base = data.pop("extends", None)
    if base is None:
        return data
    merged = _resolve_extends((path.parent / base).resolve(), field_name, (*seen, path))
    return _deep_merge(merged, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def presets_dir() -> Path:
    return Path(__file__).parent / "configs"


def preset_path(dataset: str, method: str) -> Path:
    return presets_dir() / dataset / f"{method}.yaml"


def parse_set_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError("--set", f"{text!r} is not key.path=value", "write e.g. --set optim.lr=0.05")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _nest(dotted: str, value: Any) -> dict:
    out: dict = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def load_config(
    dataset: str,
    method: str,
    *,
    config_file: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Build the config of one run. ``flags`` maps dotted paths to values from named CLI flags."""
    cfg = Config()
    preset = preset_path(dataset, method)
    if not preset.exists():
        _check_known(dataset, method)
        raise ConfigError(
            "method.name", f"no preset for dataset {dataset!r} x method {method!r}", "pass --config FILE.yaml"
        )
    _merge_into(cfg, _resolve_extends(preset, "--config"))
    embedded = preset.parent / "_embedded.yaml"
    if dataset in EMBEDDED_DATASETS and (flags or {}).get("data.root") is None and embedded.exists():
        _merge_into(cfg, _resolve_extends(embedded, "--config"))
    if config_file:
        _merge_into(cfg, _resolve_extends(Path(config_file).expanduser().resolve(), "--config"))
    layered: dict = {}
    for key, value in (flags or {}).items():
        if value is not None:
            layered = _deep_merge(layered, _nest(key, value))
    for text in overrides or []:
        layered = _deep_merge(layered, _nest(*parse_set_override(text)))
    _merge_into(cfg, layered)
    cfg.data.dataset, cfg.method.name = dataset, method
    validate(cfg)
    return cfg


def _check_known(dataset: str, method: str) -> None:
    from raynoisy.data.sources import get_source
    from raynoisy.methods import get_method_class

    get_source(dataset)
    get_method_class(method)


def validate(cfg: Config) -> None:
    """Every check that needs no data. Raises ConfigError naming the field and the fix."""
    from raynoisy.data.noise import NoiseSpec
    from raynoisy.data.sources import get_source
    from raynoisy.methods import get_method_class
    from raynoisy.models import model_names

    source = get_source(cfg.data.dataset)
    method_cls = get_method_class(cfg.method.name)
    method_cls.parse_params(cfg.method.params)
    method_cls.check_config(cfg)
    noise = NoiseSpec.parse(cfg.noise.type, cfg.noise.rate)
    if noise.type == "matrix" and not (noise.matrix_path and Path(noise.matrix_path).expanduser().is_file()):
        raise ConfigError(
            "noise.type",
            f"matrix file {noise.matrix_path} does not exist or is not a file",
            "pass --noise matrix:PATH with a row-stochastic KxK .npy or .csv",
        )
    if (
        cfg.data.root is not None
        and "://" not in cfg.data.root
        and not Path(cfg.data.root).expanduser().exists()
    ):
        raise ConfigError(
            "data.root", f"{cfg.data.root} does not exist", "pass --data-root pointing at the data set"
        )
    if source.needs_root and cfg.data.root is None and cfg.data.dataset not in EMBEDDED_DATASETS:
        raise ConfigError(
            "data.root", f"dataset {cfg.data.dataset!r} needs a data root", "pass --data-root PATH"
        )
    if source.transform == "text":
        raise ConfigError(
            "data.dataset",
            "training on text needs a text backbone, which this release does not ship",
            "use `raynoisy shard` to prepare text data, or train on an image data set",
        )
    if cfg.model.name not in model_names():
        raise ConfigError("model.name", f"unknown model {cfg.model.name!r}", f"use one of {model_names()}")
    if (
        cfg.model.pretrained not in (None, "imagenet")
        and not Path(cfg.model.pretrained).expanduser().exists()
    ):
        raise ConfigError(
            "model.pretrained", f"{cfg.model.pretrained} does not exist", "pass a local weights file"
        )
    _check_range("split.clean_fraction", cfg.split.clean_fraction, 0.0, 1.0, open_interval=True)
    _check_range("split.test_fraction", cfg.split.test_fraction, 0.0, 1.0, open_interval=True)
    _check_range("data.max_bad_fraction", cfg.data.max_bad_fraction, 0.0, 1.0)
    for name in ("clean_per_class", "val_per_class", "train_subset"):
        value = getattr(cfg.split, name)
        if value is not None and value < 1:
            raise ConfigError(f"split.{name}", f"must be >= 1, got {value}", f"pass a positive --{name}")
    o = cfg.optim
    if o.epochs < 1:
        raise ConfigError("optim.epochs", f"must be >= 1, got {o.epochs}", "pass --epochs 1 or more")
    if o.lr <= 0:
        raise ConfigError("optim.lr", f"must be > 0, got {o.lr}", "pass a positive --lr")
    if o.schedule not in ("multistep", "cosine", "constant"):
        raise ConfigError(
            "optim.schedule", f"unknown schedule {o.schedule!r}", "use multistep, cosine or constant"
        )
    s = cfg.scaling
    if s.workers < 1:
        raise ConfigError("scaling.workers", f"must be >= 1, got {s.workers}", "pass --workers 1 or more")
    if o.batch_size < s.workers or o.batch_size % s.workers:
        raise ConfigError(
            "optim.batch_size",
            f"global batch {o.batch_size} does not split evenly over {s.workers} workers",
            f"pass a --batch-size that is a multiple of {s.workers}",
        )
    if s.gpus_per_worker < 0 or (0 < s.gpus_per_worker < 1 and s.workers > 1):
        raise ConfigError(
            "scaling.gpus_per_worker",
            f"{s.gpus_per_worker} would put two DDP ranks on one GPU",
            "use 0 (CPU) or whole GPUs per worker",
        )
    if cfg.run.output is None:
        raise ConfigError("run.output", "no output directory", "pass --output DIR")


def _check_range(
    path: str, value: float | None, lo: float, hi: float, *, open_interval: bool = False
) -> None:
    if value is None:
        return
    bad = not (lo < value < hi) if open_interval else not (lo <= value <= hi)
    if bad:
        bounds = f"({lo}, {hi})" if open_interval else f"[{lo}, {hi}]"
        raise ConfigError(path, f"{value} is outside {bounds}", f"pass a value in {bounds}")


def default_shard_root() -> str:
    return os.environ.get("RAYNOISY_SHARD_ROOT", str(Path("~/.cache/raynoisy/shards").expanduser()))


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (how workers receive it)."""
    cfg = Config()
    _merge_into(cfg, values)
    return cfg
