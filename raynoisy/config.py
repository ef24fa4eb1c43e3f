"""One typed config per run: YAML presets shipped in the package, a user file, CLI flags, ``--set`` overrides.

Precedence (later wins): the preset ``configs/<dataset>/<method>.yaml`` (which may ``extends:`` a sibling
file; a data set x method without a preset starts from the data set's ``_base.yaml`` and the method's own
defaults), ``--config FILE.yaml``, the named CLI flags, then ``--set key.path=value``.

This module is the schema and the loader only: it knows no method, source or model. ``validate`` checks
what the schema alone decides (types, finite numbers, ranges, batch arithmetic); each registry checks its
own part (``raynoisy.data.check_config``, ``raynoisy.models.check_config``, ``raynoisy.methods.check_config``)
and ``raynoisy.train.preflight`` runs them all before Ray starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from raynoisy.errors import ConfigError

# Data sets that run without --data-root on a generated miniature copy in the official layout.
EMBEDDED_DATASETS = ("clothing1m", "ag-news")
# scaling.precision: float32 throughout, or training steps and evaluations under bfloat16 autocast
# (raynoisy.train.precision says what runs in which precision).
PRECISIONS = ("fp32", "bf16-mixed")
# model.pretrained: torchvision's ImageNet weights, a name and never a path (a folder so named is not read).
IMAGENET_WEIGHTS = "imagenet"


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str | None = None  # None: the source's embedded data, or an error if it has none
    options: dict = field(default_factory=dict)  # source-specific, e.g. text-table column names
    shard_root: str | None = None  # local path or pyarrow URI (s3://, gs://); None: ~/.cache/raynoisy/shards
    rows_per_shard: int = 4096
    image_size: int | None = None  # network input side; None: the source's default
    max_tokens: int = 128  # text: tokens per sample after truncation (batches are padded to their longest)
    max_bad_fraction: float = 0.01  # unreadable samples tolerated before the run fails
    # Rows one training read task reads (whole row groups, drawn at random from the split), shuffles as raw
    # bytes and decodes: the unit of shuffling and of decode parallelism (raynoisy.data.shard_reads).
    read_task_rows: int = 256
    # A local shuffle buffer of decoded samples per worker on top of that (None: none). Decoded images are
    # large: 1024 ImageNet-size crops hold 150 MB per worker and delay the first batch of every epoch.
    shuffle_buffer_rows: int | None = None


@dataclass
class NoiseConfig:
    type: str = "none"  # none | uniform | symmetric | flip | pair | matrix:PATH
    rate: float = 0.0


@dataclass
class SplitConfig:
    clean_per_class: int | None = None  # 0: no trusted set (a shipped one, e.g. Clothing1M's, goes unused)
    clean_fraction: float | None = None
    val_per_class: int | None = None
    test_fraction: float = 0.2
    train_subset: int | None = None


@dataclass
class ModelConfig:
    name: str = "small-cnn"
    # Images: a local weights path, or "imagenet" for torchvision's hub (online only). Text encoders: a local
    # Hugging Face model folder, or a hub model name (cached, or downloadable where the driver runs).
    pretrained: str | None = None
    layers: int | None = None  # text encoders: keep the first N transformer layers (None: all of them)
    # Text encoders: keep the token-embedding table as loaded. It is most of a small encoder's weights (23M
    # of BERT-base's 110M, 12M of MiniLM's 23M) and its gradient is dense: computing, syncing and stepping it
    # is over half of a CPU step of a 2-layer MiniLM.
    freeze_embeddings: bool = False


@dataclass
class MethodConfig:
    name: str = "ce"
    params: dict = field(default_factory=dict)  # validated against the method's own params dataclass
    module: str | None = None  # importable module that registers a method of your own (@register_method)


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
    precision: str = "fp32"  # fp32 | bf16-mixed (bfloat16 autocast in steps and evaluations)


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
    eval_every_steps: int | None = None  # also evaluate and checkpoint every N steps inside an epoch
    fail_once_at_step: int | None = (
        None  # fault-injection drill: the last rank dies once before this global step
    )


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
    text = hint.__name__ if isinstance(hint, type) else str(hint)  # "int", not "<class 'int'>"
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
            return _as_int(value)
        if text.startswith("float") or hint is float:
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(path, f"{value!r} is not a finite number", f"set {path} to a finite number")
            return number
        if text.startswith("str") or hint is str:
            if isinstance(value, list | tuple | dict):
                raise ValueError(value)
            return str(value)
        if text.startswith("list"):
            if not isinstance(value, list | tuple):
                raise ValueError(value)
            return [_as_int(v) for v in value] if "int" in text else list(value)
        if text.startswith("dict") or hint is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400), int(inf)
        raise ConfigError(
            path, f"{value!r} is not a valid {text}", f"set {path} to a value of type {text}"
        ) from None
    return value


def _as_int(value: Any) -> int:
    """An int, exactly (no round trip through float for ints); ``2.0`` and ``"3"`` count, ``2.5`` does not."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass  # "1e3", "2.0": through float below
    number = float(value)
    if not number.is_integer():  # also NaN and infinities
        raise ValueError(value)
    return int(number)


def user_path(path: str, field_name: str) -> Path:
    """``path`` with ``~``/``~user`` expanded; an unknown user is a ConfigError naming the field.

    ``Path.expanduser`` raises RuntimeError there (``os.path.expanduser`` returns the text unchanged).
    """
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        raise ConfigError(field_name, f"cannot expand {path!r}: no such home folder", "write the full path")
    return Path(expanded)


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
    if not all(part.strip() and part.isprintable() for part in key.split(".")):
        raise ConfigError("--set", f"{key!r} is not a dotted key path", "write e.g. --set optim.lr=0.05")
    if not raw.strip():
        return key.strip(), None
    try:
        return key.strip(), yaml.safe_load(raw)
    # PyYAML's constructors also raise ValueError and others: "2001-02-30", "!!timestamp x", 5,000 digits.
    except Exception as exc:
        reason = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            key.strip() or "--set",
            f"{raw!r} is not a YAML value ({reason})",
            "quote the value, e.g. --set 'key.path=\"text\"'",
        ) from None


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
    if not preset.exists():  # no tuned preset: the data set's base config and the method's own defaults
        preset = preset.parent / "_base.yaml"
    if preset.exists():
        _merge_into(cfg, _resolve_extends(preset, "--config"))
    embedded = preset.parent / "_embedded.yaml"
    if dataset in EMBEDDED_DATASETS and (flags or {}).get("data.root") is None and embedded.exists():
        _merge_into(cfg, _resolve_extends(embedded, "--config"))
    if config_file:
        _merge_into(cfg, _resolve_extends(user_path(config_file, "--config").resolve(), "--config"))
    layered: dict = {}
    for key, value in (flags or {}).items():
        if value is not None:
            layered = _deep_merge(layered, _nest(key, value))
    for text in overrides or []:
        layered = _deep_merge(layered, _nest(*parse_set_override(text)))
    _merge_into(cfg, layered)
    cfg.data.dataset, cfg.method.name = dataset, method
    _make_local_paths_absolute(cfg)
    validate(cfg)
    return cfg


def absolute_path(path: str | None, field_name: str) -> str | None:
    """``path`` as an absolute local path (``~`` expanded); None and URIs (``s3://...``) unchanged."""
    if path is None or "://" in path:
        return path
    try:
        return str(user_path(path, field_name).resolve())
    except (OSError, ValueError) as exc:  # a NUL character, a symlink loop
        raise ConfigError(field_name, f"{path!r} is no usable path ({exc})", "write a valid path") from None


def absolute_noise_type(noise: str, field_name: str) -> str:
    """``noise`` with the file of ``matrix:PATH`` made absolute (``absolute_path``); other types unchanged.
    The type is matched as ``raynoisy.data.noise.NoiseSpec.parse`` matches it (case and spaces ignored)."""
    kind, sep, matrix = noise.partition(":")
    if sep and kind.strip().lower() == "matrix" and matrix.strip():
        return f"{kind}:{absolute_path(matrix.strip(), field_name)}"
    return noise


def _make_local_paths_absolute(cfg: Config) -> None:
    """Resolve the config's local paths against the folder the command runs in, once, here: Ray Train
    workers and Tune trials run in folders of their own, where a relative path names another file (a
    relative ``data.shard_root`` made every worker's evaluation fail to find its shards). A
    ``model.pretrained`` is a path only where one exists and it is not ``IMAGENET_WEIGHTS``; otherwise it
    names weights (a Hugging Face hub model)."""
    cfg.data.root = absolute_path(cfg.data.root, "data.root")
    cfg.data.shard_root = absolute_path(cfg.data.shard_root, "data.shard_root")
    cfg.run.output = absolute_path(cfg.run.output, "run.output")
    cfg.run.storage_path = absolute_path(cfg.run.storage_path, "run.storage_path")
    cfg.noise.type = absolute_noise_type(cfg.noise.type, "noise.type")
    pretrained = cfg.model.pretrained
    if pretrained not in (None, IMAGENET_WEIGHTS) and user_path(pretrained, "model.pretrained").exists():
        cfg.model.pretrained = absolute_path(pretrained, "model.pretrained")


def validate(cfg: Config) -> None:
    """Every check the schema alone decides. Raises ConfigError naming the field and the fix."""
    _check_range("split.clean_fraction", cfg.split.clean_fraction, 0.0, 1.0, open_interval=True)
    _check_range("split.test_fraction", cfg.split.test_fraction, 0.0, 1.0, open_interval=True)
    _check_range("data.max_bad_fraction", cfg.data.max_bad_fraction, 0.0, 1.0)
    # 0 trusted samples per class is a run without a trusted set (mixnn, mlnt, ce); methods that need one
    # refuse it in ``raynoisy.methods.check_config``.
    if cfg.split.clean_per_class is not None and cfg.split.clean_per_class < 0:
        raise ConfigError(
            "split.clean_per_class",
            f"must be >= 0, got {cfg.split.clean_per_class}",
            "pass --clean-per-class 0 (no trusted set) or more",
        )
    for name in ("val_per_class", "train_subset"):
        value = getattr(cfg.split, name)
        if value is not None and value < 1:
            raise ConfigError(f"split.{name}", f"must be >= 1, got {value}", f"pass a positive --{name}")
    for name in ("image_size", "rows_per_shard", "read_task_rows", "shuffle_buffer_rows"):
        value = getattr(cfg.data, name)
        if value is not None and value < 1:
            raise ConfigError(f"data.{name}", f"must be >= 1, got {value}", f"set data.{name} to 1 or more")
    if cfg.data.max_tokens < 2:  # room for the tokenizer's [CLS] and [SEP]
        raise ConfigError(
            "data.max_tokens", f"must be >= 2, got {cfg.data.max_tokens}", "set data.max_tokens to 2 or more"
        )
    if cfg.model.layers is not None and cfg.model.layers < 1:
        raise ConfigError(
            "model.layers", f"must be >= 1, got {cfg.model.layers}", "set it to 1 or more, or null"
        )
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
    if s.precision not in PRECISIONS:
        fix = f"use {' or '.join(PRECISIONS)}"
        if s.precision.startswith(("fp16", "16")):
            fix = f"fp16 needs loss scaling, which the meta methods' hypergradients do not carry: {fix}"
        raise ConfigError("scaling.precision", f"unknown precision {s.precision!r}", fix)
    for name in ("eval_every_steps", "log_every_steps", "keep_checkpoints"):
        value = getattr(cfg.run, name)
        if value is not None and value < 1:
            raise ConfigError(f"run.{name}", f"must be >= 1, got {value}", f"set run.{name} to 1 or more")
    if cfg.run.max_failures < -1:
        raise ConfigError(
            "run.max_failures", f"must be >= -1, got {cfg.run.max_failures}", "-1 retries forever"
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
    """Where shards go without ``data.shard_root``: ``RAYNOISY_SHARD_ROOT`` (absolute, as a config's paths are
    made: the workers read the shards from their own folders), else ``~/.cache/raynoisy/shards``."""
    root = absolute_path(os.environ.get("RAYNOISY_SHARD_ROOT"), "RAYNOISY_SHARD_ROOT")
    return root or str(Path("~/.cache/raynoisy/shards").expanduser())


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (how workers receive it)."""
    cfg = Config()
    _merge_into(cfg, values)
    return cfg
