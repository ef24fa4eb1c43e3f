"""A method for the trainer's Ray tests, registered through ``method.module=probe_method``.

Cross-entropy plus instruments: a driver-started ``StepCounter`` service every rank adds its steps to, a
per-sample store column counting how often each sample was trained on, a record of every worker start and
of the store's digest when a checkpoint is restored, the dtypes of the network's logits in the training
steps and in the evaluation of each epoch (``probe-dtypes.jsonl``: ``scaling.precision`` decides them),
and planted failures (a ConfigError or a NaN loss at a chosen global step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raynoisy.config import Config
from raynoisy.data.batch import Batch
from raynoisy.errors import ConfigError
from raynoisy.methods import register_method
from raynoisy.methods.base import Method, MethodContext, ServiceSpec, call_service
from raynoisy.methods.supervised import MainModel


class StepCounter:
    """A service: counts the steps of all ranks over the whole run, across worker-group restarts."""

    def __init__(self) -> None:
        self.steps = 0

    def add(self, n: int) -> int:
        self.steps += n
        return self.steps

    def total(self) -> int:
        return self.steps


@dataclass
class ProbeParams:
    fail_with: str = ""  # "config" or "nan"
    at_step: int = -1  # global step (0-based) at which to fail


@register_method
class Probe(Method):
    name = "probe"
    Params = ProbeParams

    @classmethod
    def services(cls, cfg: Config) -> list[ServiceSpec]:
        return [ServiceSpec("step-counter", StepCounter)]

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.main = MainModel(ctx)
        self.steps = 0
        self.output = Path(ctx.cfg.run.output)
        with (self.output / "probe-starts.txt").open("a") as f:
            f.write(f"rank {ctx.rank}\n")
        assert ctx.sample_store is not None
        ctx.sample_store.add_dense("times_trained", 1, dtype=torch.float32)
        self.counter = ctx.services["step-counter"]
        self.dtypes: dict[str, set[str]] = {"train": set(), "eval": set()}  # since the last evaluation
        # A closure over the dict, not a bound method: copies of the network (the export's) must not copy
        # the method with it.
        dtypes = self.dtypes

        def record(net: nn.Module, _inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            dtypes["train" if net.training else "eval"].add(str(output[0].dtype))

        self.main.net.register_forward_hook(record)

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        if self.steps == self.params.at_step and self.params.fail_with == "config":
            raise ConfigError("method.params.fail_with", "planted failure", "do not plant failures")
        store = self.ctx.sample_store
        store.scatter("times_trained", batch.sample_id, store.gather("times_trained", batch.sample_id) + 1)
        stats = self.main.cross_entropy_step(batch.x, batch.y)
        if self.steps == self.params.at_step and self.params.fail_with == "nan":
            stats["loss"] = float("nan")
        self.steps += 1
        call_service(self.counter, "add", 1)
        return stats

    def on_evaluated(self, epoch: int, metrics: dict[str, float]) -> None:
        # After an evaluation (a collective), every rank's steps have reached the counter.
        if self.ctx.rank == 0:
            (self.output / "probe-service-steps.txt").write_text(str(call_service(self.counter, "total")))
            with (self.output / "probe-dtypes.jsonl").open("a") as f:
                f.write(json.dumps({mode: sorted(seen) for mode, seen in self.dtypes.items()}) + "\n")
        for seen in self.dtypes.values():
            seen.clear()

    def eval_model(self) -> nn.Module:
        return self.main.net

    def current_lr(self) -> float:
        return self.main.lr

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.steps = state["steps"]
        restored = {
            "rank": self.ctx.rank,
            "steps": self.steps,
            "store_digest": self.ctx.sample_store.digest(),
        }
        with (self.output / "probe-restored.jsonl").open("a") as f:
            f.write(json.dumps(restored) + "\n")
