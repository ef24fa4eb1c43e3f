"""Presets: every one loads, and method defaults live in one place (the method's Params dataclass)."""

import dataclasses

import pytest
import yaml

from raynoisy.config import presets_dir
from raynoisy.methods import get_method_class

PRESETS = sorted(p for p in presets_dir().glob("*/*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_preset_carries_only_what_differs_from_the_method_defaults(preset):
    params = (yaml.safe_load(preset.read_text()).get("method") or {}).get("params") or {}
    method = get_method_class(preset.stem)
    defaults = {f.name: f.default for f in dataclasses.fields(method.Params)}
    assert set(params) <= set(defaults), f"unknown params {set(params) - set(defaults)}"
    same = {k: v for k, v in params.items() if defaults[k] == v}
    assert not same, f"{preset} repeats the defaults {same}: leave them to {method.Params.__name__}"
    method.parse_params(params)  # and they are valid
