"""Training a run in one process, without Ray: for grids of small runs on a CPU machine.

A Ray run pays for the cluster's start (a minute or more) and, on a few cores, for the Ray Data pipeline
that decodes every epoch's images beside the training step. For a data set that fits in memory this
backend trains the same method classes with the same config, label plan and model selection in the
calling process: ``prepare`` plans the labels and writes (or reuses) the driver's shards, every split is
read once and decoded by the pipeline's evaluation transform into tensors, and
``raynoisy.train.harness.walk_stages`` drives the method with the loop's hooks in the loop's order,
measuring validation accuracy after every epoch (``count_hits``) and selecting with the loop's
``Selection``; the test set is measured where the reported numbers need it — an epoch whose validation
accuracy is a new best of a selectable stage, and the last epoch — so ``test_accuracy`` and
``final_test_accuracy`` are the loop's, and the history's other epochs have no test accuracy (the test
pass is most of an epoch's cost on a small training subset). The run's folder gets what the driver
writes there (config.json, labels.parquet, metrics.json with the driver's keys, model.pt, the per-sample
tables, computed as the driver's export step computes them) and history.json.

What differs from a Ray run: one worker (``scaling.workers`` must be 1), on the CPU; the training set is
reshuffled whole each epoch by a generator seeded with ``run.seed`` and the epoch, where Ray Data shuffles
files, blocks and a local buffer; the trusted stream cycles on from the start of the run instead of
restarting each epoch; evaluation happens at epoch ends only (``run.eval_every_steps`` is refused), over the
test split as one set (no per-set metrics); and there are no checkpoints, so an interrupted run starts
again. A family whose training transform augments (``cifar``, ``imagenet``) decodes and augments each
training batch from the shard payloads with the pipeline's own transform; ``small`` (no augmentation)
trains on the decoded tensors. Text is tokenised once per split by the pipeline's own transform, and every
batch taken from it is cut to its longest text (``trim_padding``), the dynamic padding the loop's batches
have.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raynoisy.config import Config
from raynoisy.data.batch import Batch, cat_inputs, trim_padding
from raynoisy.data.pipeline import BadSampleCounter, InMemorySplit, InputSpec, check_bad_fraction
from raynoisy.data.text import load_tokenizer
from raynoisy.data.transforms import UNAUGMENTED_FAMILIES
from raynoisy.errors import ConfigError, TrainingDivergedError
from raynoisy.methods.base import Method, Stage
from raynoisy.methods.label_issues import prediction_columns, summarize_label_issues
from raynoisy.train.evaluate import accuracy, count_hits
from raynoisy.train.export import LABEL_ISSUES, best_predictor, per_sample_table, summary
from raynoisy.train.harness import ModelState, build_method, method_context, walk_stages
from raynoisy.train.precision import autocast, cpu_note
from raynoisy.train.preflight import check
from raynoisy.train.prepare import Prepared, input_spec, prepare, prepare_output, steps_per_epoch
from raynoisy.train.run_files import METRICS_FILE, LoopState, write_metrics
from raynoisy.train.selection import Selection
from raynoisy.train.streams import pass_batch_size

CPU = torch.device("cpu")
HISTORY_FILE = "history.json"
# Rows decoded per call while a split is read into memory.
DECODE_ROWS = 4096
# Streams of ``run.seed``: the training set's order of each epoch, the trusted set's order of each pass,
# the cross-fitting folds.
_TRAIN_ORDER, _TRUSTED_ORDER, _FOLDS = 0, 1, 2


def train_in_process(
    cfg: Config, log: Callable[[str], None] = print, threads: int = 1, diagnose: bool = False
) -> dict[str, Any]:
    """Run one training job in this process; returns the metrics also written to ``<output>/metrics.json``.

    ``threads``: the process's compute threads while the run trains (``cpu_threads``; restored after), 1
    by default so that a grid can run one process per core side by side. ``diagnose``: after every
    epoch, score the method's per-sample outputs on the training split against its true labels
    (``label_quality``) into the history's ``diag_*`` keys — for benchmarks; the method never sees them.
    """
    start = time.time()
    check(cfg)
    check_in_process(cfg)
    output, prepared, labels = prepare_output(cfg, log)
    with cpu_threads(threads):
        data = load_splits(prepared, input_spec(cfg), cfg.data.max_bad_fraction)
        method, record = _train(cfg, prepared, data, log, diagnose)
        # The driver's export step on the final method; per_sample_table reads only Streams.method_pass.
        passes = SimpleNamespace(method_pass=method.ctx.iter_split)
        tables = per_sample_table(method, passes, 0, 1, record.selection.best) or {}
    _write_outputs(output, tables, record.selection.best)
    metrics = _metrics(cfg, prepared, labels, method, record.state, tables, time.time() - start)
    write_metrics(output, metrics)
    # metrics.json's history alone, as strict JSON as metrics.json is (a NaN accuracy is null).
    history = json.loads((output / METRICS_FILE).read_text())["history"]
    (output / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    log(
        f"[in-process] test accuracy (best-val model, epoch {metrics['best_epoch']}): "
        f"{metrics['test_accuracy']:.4f}; final-epoch test accuracy {metrics['final_test_accuracy']:.4f}; "
        f"{metrics['wall_seconds']:.0f} s; outputs in {output}"
    )
    return metrics


def cross_fitted_probabilities(
    cfg: Config, folds: int = 5, log: Callable[[str], None] = print, threads: int = 1
) -> dict[str, np.ndarray]:
    """Out-of-sample predicted probabilities for every training sample, by K-fold cross-fitting.

    Confident learning wants each sample's class probabilities from a model that did not train on it; a
    run's own model has trained on every label it is asked about, so its predictions understate how
    unlikely a memorised wrong label is (``raynoisy.methods.label_issues``). Here the training split is cut
    into ``folds`` folds, stratified by the given label and seeded by ``run.seed``; ``cfg``'s method trains
    ``folds`` times in this process, each time on the other folds with ``cfg``'s trusted, validation and
    test splits, schedule and best-validation selection (the steps per epoch follow the smaller training
    set), and its best-validation model predicts the fold it did not see. Costs ``folds`` trainings.

    Returns ``sample_id``, ``given_label`` and ``pred_probs`` (N x K softmax) sorted by sample_id: the
    model-prediction columns ``build_label_issues`` takes. Writes nothing into ``run.output``.
    """
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise ConfigError("folds", f"cross-fitting needs at least 2 folds, got {folds}", "use --folds 5")
    check(cfg)
    check_in_process(cfg)
    prepared = prepare(cfg, log)
    parts: list[dict[str, np.ndarray]] = []
    with cpu_threads(threads):
        data = load_splits(prepared, input_spec(cfg), cfg.data.max_bad_fraction)
        train = data.splits["train"]
        given = train.decoded.y.numpy()
        seed = int(np.random.default_rng([cfg.run.seed, _FOLDS]).integers(2**31))
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for fold, (fit, held_out) in enumerate(splitter.split(np.zeros(len(given)), given)):
            log(f"[cross-fit] fold {fold + 1}/{folds}: training on {len(fit)}, predicting {len(held_out)}")
            fold_data = InMemoryData({**data.splits, "train": train.take(fit)}, data.augment)
            method, record = _train(cfg, prepared, fold_data, log, diagnose=False, num_train=len(fit))
            model = best_predictor(method, record.selection.best)
            held = train.take(held_out)
            held_batches = held.chunks(pass_batch_size(cfg))
            parts.extend(prediction_columns(model, batch.without_truth()) for batch in held_batches)
    columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    order = np.argsort(columns["sample_id"], kind="stable")
    return {key: values[order] for key, values in columns.items()}


@contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Every compute thread pool of this process capped at ``threads`` inside the block, restored after:
    torch's intra-op threads, and the BLAS and OpenMP pools of the libraries loaded (NumPy's and FAISS's
    OpenBLAS, FAISS's OpenMP, through threadpoolctl). The counts are process-wide, and a grid runs one such
    process per core: a pool left at the machine's core count (the GMM's BLAS, a search of the in-process
    kNN index, which takes its thread count from torch's: ``raynoisy.knn.index.actor_threads``) would
    oversubscribe the cores that the other processes train on."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)


def check_in_process(cfg: Config) -> None:
    """Refuse what this backend would not run as the Ray loop does: several workers, step evaluations."""
    if cfg.scaling.workers != 1:
        raise ConfigError(
            "scaling.workers", "the in-process backend trains with one worker", "use --workers 1"
        )
    if cfg.run.eval_every_steps:
        raise ConfigError(
            "run.eval_every_steps",
            "the in-process backend evaluates at epoch ends only",
            "unset run.eval_every_steps, or run through Ray (without --in-process)",
        )


@dataclass
class SplitInMemory:
    """One split's shard rows in memory, and all of them decoded once by the evaluation transform."""

    rows: InMemorySplit
    decoded: Batch
    pad: int | None = None  # text: the token rows' pad id; every batch taken is cut to its longest row

    def take(self, index: np.ndarray) -> SplitInMemory:
        """The decoded samples at ``index`` (positions into ``decoded``) and their shard rows (a row that
        failed to decode is in neither)."""
        decoded = _take(self.decoded, torch.from_numpy(np.asarray(index)), self.pad)
        kept = np.isin(self.rows.rows["sample_id"], decoded.sample_id.numpy())
        return SplitInMemory(self.rows.take(kept), decoded, self.pad)

    def chunks(self, size: int) -> list[Batch]:
        """The split in shard order, in batches of ``size`` (views of the decoded tensors)."""
        starts = range(0, len(self.decoded), size)
        return [_take(self.decoded, slice(lo, lo + size), self.pad) for lo in starts]

    def shuffled(self, size: int, rng: np.random.Generator, augment: bool) -> Iterator[Batch]:
        """One pass in ``rng``'s order in batches of ``size`` (the last one short), for training: decoded and
        augmented by the pipeline's training transform if ``augment``, else taken from the decoded tensors."""
        if augment:
            yield from self.rows.batches(size, train=True, device=CPU, rng=rng)
            return
        order = torch.from_numpy(rng.permutation(len(self.decoded)))
        for lo in range(0, len(order), size):
            yield _take(self.decoded, order[lo : lo + size], self.pad)


@dataclass
class InMemoryData:
    """A prepared run's splits in memory (a split without rows is absent), and whether training augments."""

    splits: dict[str, SplitInMemory]
    augment: bool


def load_splits(prepared: Prepared, spec: InputSpec, max_bad_fraction: float) -> InMemoryData:
    """Read every split's shards into memory and decode them. A row that fails to decode is dropped and
    counted (``raynoisy.data.pipeline.to_batch``); past ``max_bad_fraction`` the run fails, as in the loop."""
    counter = BadSampleCounter()
    pad = load_tokenizer(spec.tokenizer).pad_token_id if spec.family == "text" else None
    splits = {}
    for split in prepared.shards.manifest["files"]:
        rows = InMemorySplit.read(prepared.shards.files(split), spec)
        rng = np.random.default_rng(0)  # unused: evaluation neither shuffles nor augments
        parts = list(rows.batches(DECODE_ROWS, train=False, device=CPU, rng=rng, counter=counter))
        if parts:
            splits[split] = SplitInMemory(rows, _cat(parts, pad), pad)
    check_bad_fraction(counter.bad, counter.seen, max_bad_fraction)
    return InMemoryData(splits, augment=spec.family not in UNAUGMENTED_FAMILIES)  # decode once, reuse


def _take(batch: Batch, index: slice | torch.Tensor, pad: int | None) -> Batch:
    x = batch.x[index]
    return Batch(
        x=x if pad is None else trim_padding(x, pad),
        y=batch.y[index],
        sample_id=batch.sample_id[index],
        true_y=batch.true_y[index],
    )


def _cat(parts: list[Batch], pad: int | None) -> Batch:
    return Batch(
        x=cat_inputs([p.x for p in parts], pad=0 if pad is None else pad),  # images concatenate as they are
        y=torch.cat([p.y for p in parts]),
        sample_id=torch.cat([p.sample_id for p in parts]),
        true_y=torch.cat([p.true_y for p in parts]),
    )


def _train(
    cfg: Config,
    prepared: Prepared,
    data: InMemoryData,
    log: Callable[[str], None],
    diagnose: bool,
    num_train: int | None = None,
) -> tuple[Method, EpochRecord]:
    """Build the method on the in-memory splits and walk its stages with evaluation and selection.
    ``num_train``: the training rows the steps per epoch follow (default: the shards' count)."""
    counts = prepared.shards.manifest["counts"]
    num_train = counts.get("train", 0) if num_train is None else num_train
    steps = steps_per_epoch(cfg, num_train)
    spec = input_spec(cfg)
    # Whole-split passes as the loop's ``Streams.method_pass`` gives them: batches of at least 256, in shard
    # order, with the true labels hidden. Evaluation reads the same batches: it counts hits on given labels,
    # which outside the training split are the true ones.
    passes = {
        name: [batch.without_truth() for batch in split.chunks(pass_batch_size(cfg))]
        for name, split in data.splits.items()
    }
    ctx = method_context(
        cfg,
        num_classes=prepared.catalog.num_classes,
        in_channels=spec.channels,
        image_size=spec.size,
        steps_per_epoch=steps,
        num_train=num_train,
        num_trusted=counts.get("trusted", 0),
        splits=passes,
        train_ids=data.splits["train"].decoded.sample_id.numpy(),
    )
    method = build_method(ctx)
    record = EpochRecord(
        passes.get("val", []),
        passes.get("test", []),
        steps * cfg.optim.batch_size,
        sum(stage.epochs for stage in method.stages(cfg)),
        log,
        data.splits["train"].chunks(pass_batch_size(cfg)) if diagnose else None,
    )
    if note := cpu_note(cfg.scaling.precision, CPU):
        log(f"[in-process] {note}")
    walk_stages(method, _epoch_batches(cfg, data, steps), _trusted_batches(cfg, data), record)
    return method, record


def _epoch_batches(cfg: Config, data: InMemoryData, steps: int) -> Callable[[Stage, int], Iterator[Batch]]:
    """An epoch's ``steps`` full training batches, in an order seeded by ``run.seed`` and the epoch."""
    train = data.splits["train"]

    def batches(stage: Stage, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([cfg.run.seed, _TRAIN_ORDER, epoch])
        shuffled = train.shuffled(cfg.optim.batch_size, rng, data.augment)
        return (batch.without_truth() for batch in itertools.islice(shuffled, steps))

    return batches


def _trusted_batches(cfg: Config, data: InMemoryData) -> Callable[[int], Batch] | None:
    """``trusted(size)`` for ``walk_stages``: per size, endless passes over the trusted set, each in a new
    order (the last batch of a pass short, as the loop's ``cycle_batches`` gives them); None without one."""
    trusted = data.splits.get("trusted")
    if trusted is None:
        return None
    streams: dict[int, Iterator[Batch]] = {}

    def cycle(size: int) -> Iterator[Batch]:
        for index in itertools.count():
            rng = np.random.default_rng([cfg.run.seed, _TRUSTED_ORDER, index])
            yield from trusted.shuffled(size, rng, data.augment)

    def draw(size: int) -> Batch:
        stream = streams.setdefault(size, cycle(size))
        return next(stream).without_truth()

    return draw


def label_quality(method: Method, train: list[Batch]) -> dict[str, float]:
    """The method's view of the training labels scored against the true ones (``diag_*``), from the model
    and meta network as they are after the epoch: corrected labels (their accuracy, the given labels', and
    how often they agree with the main model's own prediction) or MW-Net's mean weight of clean and
    mislabelled samples; the main model's accuracy on the training images either way."""
    if method.export_name is None:
        return {}
    net = method.eval_model()
    hits = agree = total = 0
    sums: dict[str, float] = {}
    for batch in train:
        columns = method.per_sample_outputs(batch.without_truth())
        was_training = net.training
        net.eval()
        with torch.no_grad():
            predicted = net(batch.x)[0].argmax(dim=1).numpy()
        net.train(was_training)
        true, given = batch.true_y.numpy(), batch.y.numpy()
        hits += int((predicted == true).sum())
        total += len(true)
        if "corrected_label" in columns:
            corrected = columns["corrected_label"]
            agree += int((corrected == predicted).sum())
            for key, right in (("corrected", corrected == true), ("given", given == true)):
                sums[key] = sums.get(key, 0.0) + float(right.sum())
        elif "weight" in columns:
            weight, wrong = columns["weight"], given != true
            for key, part in (("clean", ~wrong), ("mislabelled", wrong)):
                sums[f"weight_{key}"] = sums.get(f"weight_{key}", 0.0) + float(weight[part].sum())
                sums[f"n_{key}"] = sums.get(f"n_{key}", 0.0) + float(part.sum())
    out = {"diag_model_train_accuracy": hits / max(total, 1)}
    if "corrected" in sums:
        out |= {
            "diag_corrected_accuracy": sums["corrected"] / total,
            "diag_given_accuracy": sums["given"] / total,
            "diag_corrected_agrees_with_model": agree / total,
        }
    if "weight_clean" in sums:
        for key in ("clean", "mislabelled"):
            out[f"diag_weight_{key}"] = sums[f"weight_{key}"] / max(sums[f"n_{key}"], 1.0)
    return out


class EpochRecord:
    """``walk_stages``'s evaluation: accuracies as the loop measures them, its selection, its history.

    Each epoch's metrics have the loop's keys (``epoch`` 1-based, ``stage``, ``lr``, ``train_loss``,
    ``train_seconds``, ``train_<scalar>`` of the steps' means and of ``on_stage_start`` / ``on_epoch_end``,
    ``val_accuracy``, ``test_accuracy``, ``test_top5_accuracy``, ``best_val_accuracy``) and ``eval_seconds``.
    """

    def __init__(
        self,
        val: list[Batch],
        test: list[Batch],
        samples_per_epoch: int,
        epochs: int,
        log: Callable[[str], None],
        diagnose: list[Batch] | None = None,
    ) -> None:
        self.val, self.test = val, test
        self.samples_per_epoch = samples_per_epoch
        self.epochs = epochs
        self.log = log
        self.diagnose = diagnose
        self.selection = Selection()
        self.state = LoopState()

    def _needs_test(self, stage: Stage, epoch: int, val: float) -> bool:
        """The last epoch, or one that ``Selection.consider`` will make the reported best."""
        state = self.state
        new_best = state.best_epoch < 0 or not (math.isfinite(val) and val <= state.best_val_accuracy)
        return epoch + 1 == self.epochs or (stage.selectable and new_best)

    def evaluate(self, method: Method, stage: Stage, epoch: int, log: dict[str, Any]) -> dict[str, Any]:
        if not math.isfinite(log["loss"]):
            raise TrainingDivergedError(epoch + 1, method.ctx.steps_per_epoch, log["loss"])
        started = time.perf_counter()
        net = method.eval_model()
        with autocast(method.ctx.cfg.scaling.precision, CPU):
            val_top1, _, val_total = count_hits(net, self.val, CPU, {})[""]
        val = accuracy(val_top1, val_total)
        test = {"test_accuracy": float("nan"), "test_top5_accuracy": float("nan")}
        if self._needs_test(stage, epoch, val):
            with autocast(method.ctx.cfg.scaling.precision, CPU):
                test_top1, test_top5, test_total = count_hits(net, self.test, CPU, {})[""]
            test = {
                "test_accuracy": accuracy(test_top1, test_total),
                "test_top5_accuracy": accuracy(test_top5, test_total),
            }
        # A stage that cannot be selected is a warm-up without the method's view of the labels (MetaLabelNet).
        diagnose = self.diagnose is not None and stage.selectable
        diagnosis = label_quality(method, self.diagnose) if diagnose else {}
        return (
            {f"train_{key}": value for key, value in log.items() if key != "stage"}
            | test
            | diagnosis
            | {
                "val_accuracy": val,
                "epoch": epoch + 1,
                "step": 0,
                "stage": stage.name,
                "lr": method.current_lr(),
                "eval_seconds": time.perf_counter() - started,
            }
        )

    def select(self, method: Method, stage: Stage, metrics: dict[str, Any]) -> None:
        state = self.state
        self.selection.consider(state, stage, metrics, method.eval_model())
        metrics["best_val_accuracy"] = state.best_val_accuracy
        state.history.append(metrics)
        state.epoch += 1
        state.train_seconds += metrics["train_seconds"]
        state.train_samples += self.samples_per_epoch
        extra = "".join(
            f"{k.removeprefix('diag_').removeprefix('train_')} {v:.3f} "
            for k, v in metrics.items()
            if k.startswith(("diag_", "train_guard_"))
        )
        self.log(
            f"[in-process] epoch {metrics['epoch']} stage {stage.name} loss {metrics['train_loss']:.4f} "
            f"val {metrics['val_accuracy']:.4f} test {metrics['test_accuracy']:.4f} {extra}"
            f"({metrics['train_seconds'] + metrics['eval_seconds']:.1f}s)"
        )

    def stage_best(self) -> ModelState | None:
        return self.selection.next_stage(self.state)


def _write_outputs(output: Path, tables: dict[str, pa.Table], best: ModelState | None) -> None:
    """The per-sample tables and model.pt (the best-validation weights), named as the driver names them."""
    for name, table in tables.items():
        pq.write_table(table, output / f"{name}.parquet")
    if best is not None:
        torch.save(best, output / "model.pt")


def _metrics(
    cfg: Config,
    prepared: Prepared,
    labels: pa.Table,
    method: Method,
    state: LoopState,
    tables: dict[str, pa.Table],
    wall: float,
) -> dict[str, Any]:
    """metrics.json as the driver fills it (``raynoisy.train.driver``), from the run's loop state."""
    values = summary(state)
    counts = prepared.shards.manifest["counts"]
    noise = prepared.plan.noise.to_dict()
    metrics = {
        "method": cfg.method.name,
        "dataset": cfg.data.dataset,
        "backend": "in-process",
        "noise": {"type": noise["type"], "rate": noise["rate"], "actual_rate": noise["actual_rate"]},
        "clean_size": counts.get("trusted", 0),
        "train_size": counts.get("train", 0),
        "val_size": counts.get("val", 0),
        "test_size": counts.get("test", 0),
        "epochs": values["epochs"],
        "best_epoch": values["best_epoch"],
        "test_accuracy": values["test_accuracy"],
        "test_top5_accuracy": values["test_metrics"].get("test_top5_accuracy", float("nan")),
        "best_val_accuracy": values["best_val_accuracy"],
        "final_test_accuracy": values["final_test_accuracy"],
        "final_val_accuracy": values["final_val_accuracy"],
        "model_selection": "test accuracy of the epoch with the best validation accuracy",
        "wall_seconds": wall,
        "train_samples_per_second": values["train_samples_per_second"],
        "workers": 1,
        "compute_precision": cfg.scaling.precision,
        "seed": cfg.run.seed,
        "skipped_samples": len(prepared.shards.manifest["skipped"]),
        "shards": prepared.shards.uri,
        "num_classes": prepared.catalog.num_classes,
        "class_names": list(prepared.catalog.class_names),
        "steps_per_epoch": method.ctx.steps_per_epoch,
        "noise_transition_injected": noise["transition"],
        "noise_transition_empirical": noise["empirical"],
        "label_issues": summarize_label_issues(tables[LABEL_ISSUES], labels),
    }
    if method.export_name is not None:
        metrics.update(method.summarize_export(tables[method.export_name], labels))
    # The method's own facts (GLC's corruption matrix); the keys above take precedence, as in the driver.
    metrics |= {k: v for k, v in method.final_metrics().items() if k not in metrics}
    metrics["history"] = values["history"]
    return metrics
