"""Fuzzing the config: any flags and ``--set`` overrides give a checked Config or one ConfigError, never a
traceback of another kind, and never a Ray start.

Values are drawn to be hostile (NaN, infinities, huge and negative numbers, wrong types, nested lists and
mappings, text that is not YAML, paths with NUL bytes or unknown ``~user`` homes) and go through the real
CLI parser and ``raynoisy.cli.config_from_args``, i.e. ``resolve_config``, the whole preflight.

Safety: the preflight creates ``run.output`` and imports ``method.module``, so those two fields only get
values from the dedicated strategies below (relative paths, run from a temporary folder; module names that
cannot exist), and generated mapping keys are at most 5 characters, too short to spell ``output`` or
``module`` inside a ``--set run=...`` or ``--set method=...`` mapping.
"""

from __future__ import annotations

import math
import os
import urllib.error
import urllib.request
from dataclasses import fields, is_dataclass

import pytest
import ray
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raynoisy.cli import build_parser, config_from_args
from raynoisy.config import Config
from raynoisy.errors import ConfigError
from raynoisy.methods import METHODS, method_names
from raynoisy.train.preflight import resolve_config

METHOD_NAMES = method_names()  # imports every method module, so METHODS is complete


def _config_paths() -> list[str]:
    """Every dotted path of the Config dataclasses (sections too), and every method's params."""
    paths: list[str] = []

    def walk(obj: object, prefix: str) -> None:
        for f in fields(obj):  # type: ignore[arg-type]
            path = f"{prefix}{f.name}"
            paths.append(path)
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, f"{path}.")

    walk(Config(), "")
    for cls in METHODS.values():
        if is_dataclass(cls.Params):
            paths.extend(f"method.params.{f.name}" for f in fields(cls.Params))
    paths += ["data.options.columns", "method.params.nosuch", "optim.lr.deeper", "nosuch.key", "optim."]
    return sorted(set(paths))


CONFIG_PATHS = _config_paths()
# The preflight writes run.output and imports method.module: those get only the values drawn below.
GUARDED = {"run.output", "method.module", "run", "method"}

NASTY_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.0, 1.0, 0.5, 1.5, -1.0]
NASTY_INTS = [0, -1, 1, 2, 3, 2**31, 2**53 + 1, 2**63, -(2**63), 10**400, -(10**400)]
NASTY_STRINGS = [
    "", " ", "nan", "inf", "-inf", "1e400", "-1e400", "1e5", "0x10", "1_000", "true", "null", "none",
    "imagenet", "resnet18", "resnet50", "small-cnn", "multistep", "cosine", "pair", "uniform", "flip",
    "matrix:", "matrix:/nonexistent/T.npy", "matrix:~nosuch_rn_user/T.npy", "matrix:a\x00b",
    "~nosuch_rn_user/x", "a\x00b", "x" * 300, "s3://bucket/x", "/nonexistent", "sgd-plain", "random",
]  # fmt: skip
# Right-hand sides of --set that are YAML source, valid or not.
RAW_YAML = [
    "{", "[", "}", "]", "[1, 2", "{a: 1", "a: b: c", "- x\n- y", "!!python/object:os.system", "!!binary x",
    "&a [*a]", "*a", "'", '"', "@x", "`x", "%YAML 1.1", "? x", ".nan", ".inf", "-.inf", "1e400", "0o17",
    "2001-01-01", "2001-02-30", "!!timestamp x", "!!float x", "~", "[.nan, .inf]", "[1.5, 2]", "{lr: .nan}",
    "!!str", "---",
]  # fmt: skip

short_keys = st.text(max_size=5)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from(NASTY_INTS),
    st.floats(),
    st.sampled_from(NASTY_FLOATS),
    st.text(max_size=20),
    st.sampled_from(NASTY_STRINGS),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_keys, inner, max_size=3),
    max_leaves=6,
)


def as_yaml(value: object) -> str:
    """The YAML text that ``--set`` parses back to ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...")


def relative_path(text: str) -> str:
    return "rel_" + text.replace("..", "_")  # stays below the working folder, a temporary one


output_values = st.one_of(
    st.sampled_from(["~nosuch_rn_user/out", "a\x00b", "x" * 300, "", "blocker/out", "out dir", "./ok"]),
    st.text(max_size=12).map(relative_path),
    scalars.filter(lambda v: not isinstance(v, str)),
    st.lists(scalars, max_size=2),
).map(as_yaml)
module_values = st.one_of(
    st.sampled_from(["", " ", ".", ".rel", "..x", "a..b", "nosuch_rn_mod.sub", "a\x00b", "x" * 300, "1x"]),
    st.sampled_from(["raynoisy.methods.ce", "raynoisy.nosuch_rn"]),
    st.text(max_size=12).map(lambda s: "nosuch_rn_" + s),
    scalars.filter(lambda v: not isinstance(v, str)),
    st.dictionaries(short_keys, scalars, max_size=2),
).map(as_yaml)
guarded_section_values = values.map(as_yaml)  # mappings with keys too short to reach output or module


@st.composite
def overrides(draw) -> str:
    """One ``--set key.path=value``: a known or random path, a hostile value or raw YAML text."""
    random_path = st.text(max_size=15).filter(lambda p: p.strip() not in GUARDED)  # --set strips the key
    path = draw(st.sampled_from(CONFIG_PATHS) | random_path)
    if path == "run.output":
        rhs = draw(output_values)
    elif path == "method.module":
        rhs = draw(module_values)
    elif path in GUARDED:
        rhs = draw(guarded_section_values)
    else:
        rhs = draw(st.one_of(values.map(as_yaml), st.sampled_from(RAW_YAML), st.text(max_size=20)))
    return f"{path.replace('=', '_')}={rhs}"


flag_ints = st.one_of(st.integers(min_value=-(10**30), max_value=10**30), st.sampled_from(NASTY_INTS[:-2]))
flag_floats = st.one_of(st.floats(), st.sampled_from(NASTY_FLOATS))
noise_texts = st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=15))
FLAG_STRATEGIES = {
    "--lr": flag_floats.map(repr),
    "--noise-rate": flag_floats.map(repr),
    "--epochs": flag_ints.map(str),
    "--batch-size": flag_ints.map(str),
    "--workers": flag_ints.map(str),
    "--clean-per-class": flag_ints.map(str),
    "--seed": flag_ints.map(str),
    "--noise": noise_texts,
}


@st.composite
def command_lines(draw) -> tuple[str, str, list[str]]:
    dataset = draw(st.sampled_from(["digits", "fashion-mnist"]))
    method = draw(st.sampled_from(METHOD_NAMES))
    argv: list[str] = []
    for flag, strategy in FLAG_STRATEGIES.items():
        if draw(st.sampled_from([False, False, True])):  # a third each: errors mask each other less
            argv.append(f"{flag}={draw(strategy)}")  # the = form, so "-1" or "-x" is a value, not a flag
    for text in draw(st.lists(overrides(), max_size=3)):
        argv.append(f"--set={text}")
    return dataset, method, argv


def test_any_flags_and_overrides_give_a_config_or_a_config_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative run.output values land here
    (tmp_path / "blocker").write_text("a file where a folder would go")
    (tmp_path / "fashion-mnist").mkdir()  # the preflight only checks that the data root exists
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called during the preflight")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(ray, "init", refuse)
    was_initialized = ray.is_initialized()
    parser = build_parser()
    outcomes = {"config": 0, "config_error": 0}

    @settings(
        max_examples=int(os.environ.get("RAYNOISY_FUZZ_EXAMPLES", "150")),  # raise it to search longer
        deadline=None,
        database=None,  # nothing written into the checkout; a failure prints its reproducing example
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(command_lines())
    def check(command: tuple[str, str, list[str]]) -> None:
        dataset, method, argv = command
        root = ["--data-root", str(tmp_path / "fashion-mnist")] if dataset == "fashion-mnist" else []
        fixed = ["train", "--dataset", dataset, "--method", method, "--output", str(tmp_path / "out")]
        args = parser.parse_args([*fixed, *root, *argv])
        try:
            cfg = config_from_args(args)
        except ConfigError as error:
            outcomes["config_error"] += 1
            assert error.field and error.problem and error.fix
        else:
            outcomes["config"] += 1
            assert isinstance(cfg, Config)
            assert (cfg.data.dataset, cfg.method.name) == (dataset, method)
        assert ray.is_initialized() is was_initialized

    check()
    # Both outcomes occur, so the strategies neither only produce garbage nor only produce valid configs.
    assert outcomes["config"] and outcomes["config_error"], outcomes


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["data={"], "data"),  # yaml.parser.ParserError
        (["optim.lr=a: b: c"], "optim.lr"),  # yaml.scanner.ScannerError
        (["optim.lr=2001-02-30"], "optim.lr"),  # ValueError from PyYAML's date constructor
        (["optim.lr=!!binary x"], "optim.lr"),  # yaml.constructor.ConstructorError
        (["=null"], "--set"),  # a ConfigError with an empty field
        ([".=null"], "--set"),  # the same, through an empty dotted part
        (["run.eval_every_steps=.inf"], "run.eval_every_steps"),  # OverflowError: int(inf)
        (["optim.epochs=1e400"], "optim.epochs"),  # OverflowError: int(float("1e400"))
        ([f"optim.lr={10**400}"], "optim.lr"),  # OverflowError: float(10**400)
        (["optim.milestones=[.inf]"], "optim.milestones"),  # OverflowError in the list
        (["method.params=.nan"], "method.params"),  # AttributeError: 'float' object has no attribute 'items'
        (["data.options=5"], "data.options"),  # silently accepted: bare `dict` hints were not checked
        (["run.output=[a, b]"], "run.output"),  # silently became the folder "['a', 'b']"
        (['run.output="a\\0b"'], "run.output"),  # ValueError: embedded null byte
        (["run.output=~nosuch_rn_user/x"], "run.output"),  # RuntimeError: Could not determine home directory
        (["data.root=~nosuch_rn_user/x"], "data.root"),  # the same
        (["noise.type=matrix:~nosuch_rn_user/T.npy"], "noise.type"),  # the same
        (
            ["model.name=resnet18", "data.image_size=224", "model.pretrained=~nosuch_rn_user/w.pt"],
            "model.pretrained",
        ),
        (["method.module=''"], "method.module"),  # ValueError: Empty module name
        (["method.module=.rel"], "method.module"),  # TypeError: the 'package' argument is required
    ],
)
def test_inputs_the_fuzzer_found(overrides, field, tmp_path):
    """Each of these raised something else than a ConfigError (or was accepted) before the fix."""
    with pytest.raises(ConfigError) as info:
        resolve_config("digits", "ce", flags={"run.output": str(tmp_path)}, overrides=overrides)
    assert info.value.field == field and info.value.fix


def test_large_integers_are_kept_exactly(tmp_path):
    """Ints no longer round-trip through float, which turned seed 2**64 + 1 into 2**64."""
    cfg = resolve_config(
        "digits", "ce", flags={"run.output": str(tmp_path)}, overrides=[f"run.seed={2**64 + 1}"]
    )
    assert cfg.run.seed == 2**64 + 1
