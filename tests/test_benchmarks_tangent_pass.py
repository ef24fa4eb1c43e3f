"""benchmarks/tangent_pass.py: its hand-written tangent rules compute the engine's J (float64); it runs."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

from raynoisy.meta.output_hypergrad import jvp
from raynoisy.models.registry import build_model


def test_tangent_rules_equal_forward_mode_ad_in_float64() -> None:
    bench = load_benchmark("tangent_pass")
    torch.manual_seed(0)
    net = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28).double().train()
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    params = dict(net.named_parameters())
    tangents = {name: torch.randn_like(p) for name, p in params.items()}
    saved, handles = bench.record_layers(net)
    net(x)
    for handle in handles:
        handle.remove()
    expected = jvp(net, params, tangents, x)
    torch.testing.assert_close(bench.tangent_by_rules(net, saved, tangents), expected, rtol=1e-10, atol=1e-10)


def test_the_benchmark_prints_every_pass(capsys: pytest.CaptureFixture[str]) -> None:
    rows = load_benchmark("tangent_pass").main(["--batch-size", "8", "--repeats", "2"])
    assert [name for name, _ in rows][1].startswith("jvp") and all(ms > 0 for _, ms in rows)
    assert "| tangent rules on the saved forward |" in capsys.readouterr().out
