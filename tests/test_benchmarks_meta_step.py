"""The meta-step benchmark runs at CI size and produces a sane row per method.

No timing thresholds here: CI machines are shared and a 2-core step at batch 8 says nothing about the
targets, which the benchmark itself checks at full size (its exit status). What the tests guard is that
the benchmark keeps building every registered method the way the trainer does and keeps measuring it, and
that the pass counts its floors are priced from are the passes the steps really make.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from benchmark_scripts import load_benchmark
from torch.autograd import forward_ad

from raynoisy.data.sources import get_source
from raynoisy.data.transforms import UNAUGMENTED_FAMILIES
from raynoisy.meta.lookahead import unwrap_model


def test_meta_step_small_gives_a_finite_ratio_per_method(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("meta_step")
    report = bench.main(["--small", "--models", "small-cnn", "--device", "cpu"])

    measured = [row.method for row in report.rows]
    expected = [m for m in bench.DEFAULT_METHODS if m not in report.skipped]
    assert measured == expected, f"one row per registered method, CE first; skipped: {report.skipped}"
    assert bench.BASELINE in measured
    for row in report.rows:
        assert row.model == "small-cnn"
        for value in (row.median_ms, row.ratio, row.peak_mib, row.peak_ratio, row.held_mib):
            assert math.isfinite(value) and value > 0, row
        assert row.cpu_ratio is not None and math.isfinite(row.cpu_ratio) and row.cpu_ratio > 0
        assert row.finite, f"{row.method} logged a non-finite value"
    baseline = report.rows[0]
    assert baseline.ratio == pytest.approx(1.0) and baseline.peak_ratio == pytest.approx(1.0)
    # The step timed is the first selectable stage's (fashion-mnist preset: 10 epochs, GLC 10 per phase,
    # MetaLabelNet round(10 * 44 / 120) = 4 warm-up epochs); single-stage methods time every epoch's step.
    phases = {row.method: row.phase for row in report.rows}
    expected_phases = {
        "ce": "every epoch",
        "glc": "corrected: epochs 10-19 of 20 (50%)",
        "mwnet": "every epoch",
        "mlc": "every epoch",
        "metalabelnet": "meta: epochs 4-9 of 10 (60%)",
        "mlnt-first-order": "every epoch",  # start_iter = mid_iter = 0: the meta step from step 0
        "mlnt-second-order": "every epoch",
        "mixnn": "mix: epochs 1-9 of 10 (90%)",  # its preset's warm-up epoch runs CE
        "mixnn-steps": "mix: epochs 1-9 of 10 (90%)",
    }
    assert phases == {m: p for m, p in expected_phases.items() if m in phases}
    targets = {row.method: row.target for row in report.rows}
    assert targets["mlnt-first-order"] == 4.0 and targets["mlnt-second-order"] == 8.0
    assert targets["ce"] is None and targets["mixnn"] is None
    # MixNN's refresh, timed by the method's own clock on a synthetic split of --mixnn-train samples.
    refresh, from_steps = report.refresh_rows
    assert (refresh.method, from_steps.method) == ("mixnn", "mixnn-steps")
    for row in (refresh, from_steps):
        assert row.samples == bench.SMALL["mixnn_train"] and row.steps_per_epoch == 512 // 8
        assert row.refresh_s >= sum(row.parts_s.values()) > 0 and 0 < row.share < 1
    # refresh_from = steps reads what the steps recorded: no forward over the 512 samples.
    assert from_steps.parts_s["pass"] < refresh.parts_s["pass"] / 2

    out = capsys.readouterr().out
    assert "| model | method |" in out
    for method in measured:
        assert f"| small-cnn | {method} |" in out
    for method in report.skipped:
        assert f"skipping {method}" in out
    assert "| small-cnn | mixnn | 512 | 64 |" in out  # the refresh table
    assert "| small-cnn | mixnn-steps | 512 | 64 |" in out


def test_meta_step_times_amortised_meta_updates(capsys: pytest.CaptureFixture[str]) -> None:
    """--meta-every K adds a METHOD@kK row after each meta method: a cycle of K real steps per round."""
    bench = load_benchmark("meta_step")
    methods = ["mwnet", "mlc", "metalabelnet"]
    argv = ["--small", "--models", "small-cnn", "--device", "cpu", "--methods", *methods, "--meta-every", "3"]
    report = bench.main(argv)

    rows = {row.method: row for row in report.rows}
    assert list(rows) == ["ce", "mwnet", "mwnet@k3", "mlc", "mlc@k3", "metalabelnet", "metalabelnet@k3"]
    for name in methods:
        meta, amortised = rows[name], rows[f"{name}@k3"]
        assert meta.meta_every == 1 and meta.meta_step_ms is None
        assert amortised.meta_every == 3 and amortised.phase == meta.phase and amortised.finite
        for value in (amortised.median_ms, amortised.ratio, amortised.meta_step_ms, amortised.plain_step_ms):
            assert value is not None and math.isfinite(value) and value > 0, amortised
        # (meta + 2 plain passes) / 3 is below the meta step's own floor; no target below K = 5.
        assert amortised.floor_ratio is not None and meta.floor_ratio is not None
        assert amortised.floor_ratio < meta.floor_ratio
        assert amortised.target is None
    out = capsys.readouterr().out
    assert "| model | row | K | meta step ms |" in out and "| small-cnn | mlc@k3 | 3 |" in out


def test_amortised_rows_are_named_method_at_k() -> None:
    bench = load_benchmark("meta_step")
    assert bench.variant("mwnet@k5") == ("mwnet", {"meta_every": 5}, 5)
    assert bench.variant("mlnt-first-order")[0] == "mlnt"
    assert bench.target_of("mlc@k5") == bench.target_of("mlc@k10") == 1.5
    assert bench.target_of("mlc@k2") is None and bench.target_of("mlc") == bench.TARGETS["mlc"]
    for bad in ("ce@k2", "mwnet@k0", "mwnet@k00", "mwnet@kx", "mwnet@t0", "mwnet@t00", "mwnet@", "mlc@t4k2"):
        with pytest.raises(ValueError, match="METHOD@kK"):
            bench.variant(bad)
    assert bench.variant("mlc@t32") == ("mlc", {"trusted_batch_size": 32}, 1)
    assert bench.variant("mlc@k5t32") == ("mlc", {"meta_every": 5, "trusted_batch_size": 32}, 5)
    supervised = {"corrector_supervision": 1.0, "meta_every": 5, "trusted_batch_size": 32}
    assert bench.variant("mlc-supervised@k5t32") == ("mlc", supervised, 5)
    with pytest.raises(ValueError, match="VARIANTS row"):
        bench.variant("mlnt-first-order@k2")
    assert bench.target_of("mlc@t32") == bench.TARGETS["mlc"] and bench.target_of("mlc@k5t32") == 1.5
    assert bench.with_amortised_rows(["ce", "mlc", "glc"], [2, 5]) == ["ce", "mlc", "mlc@k2", "mlc@k5", "glc"]


def test_bf16_rows_are_judged_against_ce_in_bf16(capsys: pytest.CaptureFixture[str]) -> None:
    """--bf16 adds a ROW+bf16 twin of every row, ce+bf16 among them; their ratios are to ce+bf16."""
    bench = load_benchmark("meta_step")
    assert bench.with_bf16_rows(["ce", "mlc@k5"], True) == ["ce", "mlc@k5", "ce+bf16", "mlc@k5+bf16"]
    assert bench.with_bf16_rows(["ce", "mlc+bf16"], False) == ["ce", "ce+bf16", "mlc+bf16"]
    assert bench.with_bf16_rows(["ce", "mlc"], False) == ["ce", "mlc"]
    assert bench.variant("mlc@k5+bf16") == bench.variant("mlc@k5") and bench.target_of("mlc+bf16") == 2.5
    report = bench.main(["--small", "--models", "small-cnn", "--device", "cpu", "--methods", "mlc", "--bf16"])
    rows = {row.method: row for row in report.rows}
    assert list(rows) == ["ce", "mlc", "ce+bf16", "mlc+bf16"]
    assert rows["ce+bf16"].ratio == 1.0 and all(row.finite for row in rows.values())
    mixed = rows["mlc+bf16"]
    assert mixed.ratio == pytest.approx(mixed.median_ms / rows["ce+bf16"].median_ms)
    assert mixed.floor_ratio is not None and mixed.floor_ratio > 1
    out = capsys.readouterr().out
    assert "passes under bf16-mixed" in out and "| small-cnn | mlc | " in out.split("| speed-up |")[1]


def test_a_smaller_trusted_batch_prices_its_gold_passes_by_its_size(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--trusted-batch N adds METHOD@tN rows; their floor takes N / batch of the trusted passes."""
    bench = load_benchmark("meta_step")
    passes = {"F": 3.0, "B": 5.0, "J": 7.0, "E": 11.0}
    full = bench.floor_seconds("mwnet", passes, 8, True)
    assert full == 2 * 3.0 + 3 * 5.0 + 7.0
    assert bench.floor_seconds("mwnet@t2", passes, 8, True) == pytest.approx(full - 0.75 * (3.0 + 5.0))
    amortised = bench.floor_seconds("mlc@k2t4", passes, 8, True)
    # meta step: the gold and clean halves at half size; plain step: the noisy F + B and a clean half of 2
    meta, plain = 2 * 3.0 + 2 * 5.0 + 7.0 - 0.5 * 8.0, 8.0 + 0.25 * 8.0
    assert amortised == pytest.approx((meta + plain) / 2)

    argv = [
        "--small",
        "--models",
        "small-cnn",
        "--device",
        "cpu",
        "--methods",
        "mwnet",
        "mlc",
        "--trusted-batch",
        "4",
    ]
    report = bench.main(argv)
    rows = {row.method: row for row in report.rows}
    assert list(rows) == ["ce", "mwnet", "mwnet@t4", "mlc", "mlc@t4"]
    for name in ("mwnet", "mlc"):
        assert rows[f"{name}@t4"].finite and rows[f"{name}@t4"].floor_ratio < rows[name].floor_ratio


def _counted_passes(run: Any, batch: Any, batch_size: int, dtypes: set[torch.dtype]) -> dict[str, float]:
    """The network passes one step (an amortised row: its whole cycle, divided by K) really makes, counted by
    hooks on the main network and MetaLabelNet's frozen encoder, in units of the noisy batch: a forward with
    a tangent is J; one in eval mode or without grad is E; any other is F, and every backward through its
    logits (a hook on them) is B. The dtypes of the logits go into ``dtypes``."""
    counts: Counter[str] = Counter()

    def on_forward(module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        logits, share = output[0], inputs[0].shape[0] / batch_size
        dtypes.add(logits.dtype)
        if forward_ad.unpack_dual(logits).tangent is not None:
            counts["J"] += share
        elif not module.training or not torch.is_grad_enabled():
            counts["E"] += share
        else:
            counts["F"] += share
            logits.register_hook(lambda grad: counts.update({"B": share}))

    method = run.method
    encoder = getattr(method, "encoder", None)
    nets = [unwrap_model(method.main.net)] + ([encoder] if encoder is not None else [])
    handles = [net.register_forward_hook(on_forward) for net in nets]
    try:
        for index, takes_trusted in enumerate(run.cycle):
            run.step(batch, run.trusted if takes_trusted else None, index)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: n / len(run.cycle) for kind, n in counts.items() if n}


@pytest.mark.parametrize(
    "row",
    [
        "ce",
        "mwnet",
        "mlc",
        "metalabelnet",
        "mwnet@t4",
        "mlc@t4",
        "metalabelnet@t2",
        "mlc@k3",
        "mwnet@k2t4",
        "metalabelnet-uncached",
        "mwnet-example",
        "mwnet-trusted",
        "mlc-supervised",
        "mwnet-trusted@k2t4",
        "mlc-supervised@k3t4",
        "mlc+bf16",
        "metalabelnet+bf16",
    ],
)
def test_passes_are_the_passes_a_step_makes(row: str, tmp_path: Path) -> None:
    """``PASSES`` (and what the trusted-batch, amortised and bf16 rows derive from it) against hook counts;
    a ``+bf16`` row's passes all give bfloat16 logits, the others float32."""
    bench = load_benchmark("meta_step")
    spec, batch_size = bench.MODELS["small-cnn"], 8
    source = get_source(spec.dataset)
    batch = bench.synthetic_batch(
        batch_size, spec, source.channels, source.image_size, torch.device("cpu"), 0
    )
    pool = bench.synthetic_batch(
        4 * batch_size, spec, source.channels, source.image_size, torch.device("cpu"), 1
    )
    split = bench.split_of(row, (), batch)
    run = bench.build_run(row, spec, batch_size, torch.device("cpu"), str(tmp_path), pool, [], split)
    expected = bench.pass_counts(row, batch_size, source.transform in UNAUGMENTED_FAMILIES)
    dtypes: set[torch.dtype] = set()
    counted = _counted_passes(run, batch, batch_size, dtypes)
    assert counted == pytest.approx({kind: n for kind, n in expected.items() if n})
    assert dtypes == {torch.bfloat16 if row.endswith("+bf16") else torch.float32}
