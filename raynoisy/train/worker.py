"""The Ray Train worker loop: drives one method through its epochs on every rank.

The same function runs with one worker on a laptop and many on a cluster. Rank 0 writes TensorBoard
scalars, progress lines and checkpoints; every rank calls ``ray.train.report`` once per epoch (it is a
barrier). A restarted worker group resumes from the latest checkpoint with all state: networks,
optimizers, schedules, per-sample state, the best-validation model, history and RNG state.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raynoisy.config import Config, config_from_dict
from raynoisy.data.pipeline import (
    IN_MEMORY_BYTES,
    BadSampleCounter,
    InMemorySplit,
    InputSpec,
    check_bad_fraction,
    cycle_batches,
    files_for_rank,
    image_dataset,
    iter_batches,
    quiet_ray_data,
    total_bytes,
)
from raynoisy.meta.sync import all_reduce_mean_, all_reduce_sum_, assert_replicas_identical
from raynoisy.methods import get_method_class
from raynoisy.methods.base import Method, MethodContext
from raynoisy.train.evaluate import accuracy, count_correct

STATE_FILE = "state.pt"
BEST_MODEL_FILE = "best_model.pt"
SUMMARY_FILE = "summary.json"


def emit(text: str) -> None:
    """One progress line to the process's real stdout, which Ray streams to the driver.

    Not plain ``print``: Ray Train V2 patches ``print`` in its workers to log through the root logger and,
    because Ray has replaced ``sys.stdout``, to also tee to the original print, so every line reached the
    driver twice.
    """
    stream = sys.__stdout__ or sys.stdout
    stream.write(f"[raynoisy] {text}\n")
    stream.flush()


@dataclass
class RunInfo:
    """Facts about the prepared data that every worker needs; computed once by the driver."""

    num_classes: int
    input: InputSpec
    files: dict[str, list[str]]
    counts: dict[str, int]
    steps_per_epoch: int
    output: str
    fault_marker: str
    actual_noise_rate: float


@dataclass
class Progress:
    """Loop state that survives restarts (saved in every checkpoint)."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_accuracy: float = float("nan")
    best_test_accuracy: float = float("nan")
    train_seconds: float = 0.0
    train_samples: int = 0


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def state_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state dict, keyed by its path: what must match across ranks."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = (
        state.items()
        if isinstance(state, dict)
        else enumerate(state)
        if isinstance(state, list | tuple)
        else ()
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(state_tensors(value, f"{prefix}/{key}"))
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class WorkerLoop:
    """One rank's view of the run."""

    def __init__(self, cfg: Config, info: RunInfo) -> None:
        ctx = ray.train.get_context()
        quiet_ray_data()
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        self.cfg, self.info = cfg, info
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        cpus = cfg.scaling.cpus_per_worker or 1
        torch.set_num_threads(max(1, int(cpus)))
        _seed_everything(cfg.run.seed)
        self.method_cls = get_method_class(cfg.method.name)
        self.bad = BadSampleCounter()
        self.method: Method = self.method_cls(
            MethodContext(
                cfg=cfg,
                num_classes=info.num_classes,
                in_channels=info.input.channels,
                image_size=info.input.size,
                device=self.device,
                rank=self.rank,
                world_size=self.world,
                steps_per_epoch=info.steps_per_epoch,
                num_train=info.counts.get("train", 0),
                num_trusted=info.counts.get("trusted", 0),
                iter_trusted_pass=lambda: self._eval_batches("trusted"),
            )
        )
        self._in_memory: dict[str, InMemorySplit | None] = {}
        self.progress = Progress()
        self.best_state: dict | None = None
        self.writer = None
        if self.rank == 0 and cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(info.output) / "tensorboard"))

    # ---- data -------------------------------------------------------------------------------------
    def _eval_batches(self, split: str):
        """This rank's files of ``split`` with the evaluation transform; small splits stay in memory."""
        files = files_for_rank(self.info.files.get(split, []), self.rank, self.world)
        batch_size = max(256, self.cfg.optim.batch_size)
        if not files:
            return iter(())
        if split not in self._in_memory:
            small = total_bytes(files) <= IN_MEMORY_BYTES and split != "train"
            self._in_memory[split] = InMemorySplit(files, self.info.input) if small else None
        cached = self._in_memory[split]
        if cached is not None:
            return cached.batches(batch_size, train=False, device=self.device, rng=np.random.default_rng(0))
        ds = image_dataset(files, self.info.input, train=False)
        return iter_batches(
            ds, batch_size=batch_size, family=self.info.input.family, device=self.device, counter=self.bad
        )

    def _trusted_stream(self):
        size = self.method.trusted_batch_size()
        if size == 0:
            return None
        seed = self.cfg.run.seed * 1000 + self.rank + 7919 * self.progress.epoch
        return cycle_batches(
            self.info.files["trusted"],
            self.info.input,
            batch_size=size,
            device=self.device,
            seed=seed,
            counter=self.bad,
        )

    def _epoch_batches(self, trusted_stream):
        if self.method_cls.epoch_source == "trusted":
            for _ in range(self.info.steps_per_epoch):
                yield next(trusted_stream), None
            return
        shard = ray.train.get_dataset_shard("train")
        batches = iter_batches(
            shard,
            batch_size=self.cfg.optim.batch_size // self.world,
            family=self.info.input.family,
            device=self.device,
            counter=self.bad,
            drop_last=True,
            shuffle_rows=self.cfg.data.shuffle_buffer_rows,
        )
        for batch in batches:
            yield batch, (next(trusted_stream) if trusted_stream is not None else None)

    # ---- checkpoints -------------------------------------------------------------------------------
    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=self.device, weights_only=False)
            best_path = Path(d) / BEST_MODEL_FILE
            self.best_state = torch.load(best_path, map_location="cpu") if best_path.exists() else None
        self.method.load_state_dict(state["method"])
        self.progress = Progress(**state["progress"])
        _set_rng_state(state["rng"])
        self._log(f"resumed from checkpoint at epoch {self.progress.epoch}")

    def _write_checkpoint(self, d: Path) -> None:
        torch.save(
            {"method": self.method.state_dict(), "progress": asdict(self.progress), "rng": _rng_state()},
            d / STATE_FILE,
        )
        if self.best_state is not None:
            torch.save(self.best_state, d / BEST_MODEL_FILE)

    def _report(self, metrics: dict, extra_files=None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                d = Path(tmp)
                self._write_checkpoint(d)
                if extra_files is not None:
                    extra_files(d)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    # ---- logging ----------------------------------------------------------------------------------
    def _log(self, text: str) -> None:
        if self.rank == 0:
            emit(text)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, int | float) and np.isfinite(value):
                self.writer.add_scalar(key, value, step)

    # ---- the loop ---------------------------------------------------------------------------------
    def _maybe_inject_failure(self, epoch: int) -> None:
        drill = self.cfg.run.fail_once_at_epoch
        if drill is None or epoch != drill or self.rank != self.world - 1:
            return
        marker = Path(self.info.fault_marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank {self.rank} failed on purpose at epoch {epoch}\n")
        emit(f"fault drill: rank {self.rank} exits at epoch {epoch}")
        os._exit(1)

    def _check_bad_fraction(self) -> None:
        counts = torch.tensor([self.bad.bad, self.bad.seen], dtype=torch.float64)
        all_reduce_sum_([counts])
        bad, seen = int(counts[0]), int(counts[1])
        check_bad_fraction(bad, seen, self.cfg.data.max_bad_fraction)
        self.epoch_bad = bad

    def train_epoch(self, epoch: int, total_epochs: int) -> dict[str, float]:
        self.method.on_epoch_start(epoch)
        self.bad.reset()
        trusted = self._trusted_stream()
        sums: dict[str, float] = {}
        steps, samples, start = 0, 0, time.time()
        for batch, trusted_batch in self._epoch_batches(trusted):
            stats = self.method.train_step(batch, trusted_batch)
            steps += 1
            samples += len(batch)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            if self.rank == 0 and steps % self.cfg.run.log_every_steps == 0:
                rate = samples * self.world / max(1e-9, time.time() - start)
                self._log(
                    f"epoch {epoch + 1}/{total_epochs} step {steps}/{self.info.steps_per_epoch} "
                    f"loss {sums.get('loss', 0.0) / steps:.4f} lr {self.method.current_lr():.4g} "
                    f"{rate:.0f} samples/s"
                )
                global_step = epoch * self.info.steps_per_epoch + steps
                self._scalars(
                    {f"train/{k}": v for k, v in stats.items()} | {"train/lr": self.method.current_lr()},
                    global_step,
                )
        seconds = time.time() - start
        self.progress.train_seconds += seconds
        self.progress.train_samples += samples * self.world
        out = {f"train_{k}": v / max(1, steps) for k, v in sums.items()}
        out.update({f"train_{k}": v for k, v in self.method.on_epoch_end(epoch).items()})
        out["train_seconds"] = seconds
        out["train_samples_per_second"] = samples * self.world / max(1e-9, seconds)
        return out

    def run(self) -> None:
        self.restore()
        total = self.method.total_epochs()
        for epoch in range(self.progress.epoch, total):
            self._maybe_inject_failure(epoch)
            metrics = self.train_epoch(epoch, total)
            net = self.method.eval_model()
            # BatchNorm running statistics drift apart on each rank's own batches (DDP only broadcasts them
            # at the next forward): average them so evaluation and the checkpoint see the global statistics.
            all_reduce_mean_([b for b in net.buffers() if b.is_floating_point()])
            val = count_correct(net, self._eval_batches("val"), self.device)
            test = count_correct(net, self._eval_batches("test"), self.device)
            self._check_bad_fraction()
            assert_replicas_identical(state_tensors(self.method.state_dict()))
            metrics.update(
                epoch=epoch + 1,
                val_accuracy=accuracy(*val),
                test_accuracy=accuracy(*test),
                lr=self.method.current_lr(),
                bad_samples=self.epoch_bad,
                replicas_identical=True,
            )
            self._select(epoch, metrics, net)
            metrics["best_val_accuracy"] = self.progress.best_val_accuracy
            self.progress.history.append(metrics)
            self.progress.epoch = epoch + 1
            self._log(
                f"epoch {epoch + 1}/{total} done in {metrics['train_seconds']:.1f}s: "
                f"train loss {metrics.get('train_loss', float('nan')):.4f} "
                f"val {metrics['val_accuracy']:.4f} test {metrics['test_accuracy']:.4f}"
            )
            self._scalars(
                {f"epoch/{k}": v for k, v in metrics.items()}
                | {"epoch/actual_noise_rate": self.info.actual_noise_rate},
                epoch + 1,
            )
            self._report(metrics)
        self.finish()

    def _select(self, epoch: int, metrics: dict, net: torch.nn.Module) -> None:
        """Best-validation selection over the epochs the method allows (the last one without a val set)."""
        if not self.method.selectable(epoch):
            return
        val = metrics["val_accuracy"]
        best = self.progress.best_val_accuracy
        better = not np.isfinite(val) or not np.isfinite(best) or val > best
        if better or self.progress.best_epoch < 0:
            self.progress.best_epoch = epoch + 1
            self.progress.best_val_accuracy = val
            self.progress.best_test_accuracy = metrics["test_accuracy"]
            if self.rank == 0:
                self.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    def _export_table(self) -> pa.Table | None:
        """The method's per-sample table over the whole training split, gathered to rank 0."""
        if self.method_cls.export_name is None:
            return None
        columns: dict[str, list] = {}
        for batch in self._eval_batches("train"):
            for key, value in self.method.per_sample_outputs(batch).items():
                columns.setdefault(key, []).append(np.asarray(value))
        part = {k: np.concatenate(v) for k, v in columns.items()}
        parts = [part]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, part)
        if self.rank != 0:
            return None
        filled = [p for p in parts if p]
        if not filled:
            return None
        merged = {k: np.concatenate([p[k] for p in filled]) for k in filled[0]}
        table = {k: list(v) if v.ndim > 1 else v for k, v in merged.items()}
        return pa.table(table).sort_by("sample_id")

    def finish(self) -> None:
        p = self.progress
        last = p.history[-1] if p.history else {}
        summary = {
            "epochs": p.epoch,
            "best_epoch": p.best_epoch,
            "best_val_accuracy": p.best_val_accuracy,
            "test_accuracy": p.best_test_accuracy,
            "final_test_accuracy": last.get("test_accuracy", float("nan")),
            "final_val_accuracy": last.get("val_accuracy", float("nan")),
            "train_seconds": p.train_seconds,
            "train_samples_per_second": p.train_samples / max(1e-9, p.train_seconds),
            "history": p.history,
        }
        table = self._export_table()

        def write(d: Path) -> None:
            (d / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=float))
            if table is not None:
                pq.write_table(table, d / f"{self.method_cls.export_name}.parquet")

        self._log(
            f"finished: best epoch {p.best_epoch}, val {p.best_val_accuracy:.4f}, "
            f"test {p.best_test_accuracy:.4f}"
        )
        self._report(
            {k: v for k, v in summary.items() if k != "history"} | {"final": True}, extra_files=write
        )
        if self.writer is not None:
            self.writer.close()


def train_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker."""
    cfg = config_from_dict(loop_config["cfg"])
    info = loop_config["info"]
    WorkerLoop(cfg, info).run()
