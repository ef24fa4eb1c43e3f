"""MixNN with a fault drill for the Ray tests, registered through ``method.module=mixnn_probe``.

``mixnn-probe`` is MixNN plus one instrument: at global step ``kill_index_at_step`` rank 0 kills the run's
``knn-index`` actor with ``ray.kill`` (Ray restarts it: ``__init__`` again, an empty index) and waits until
the restarted instance answers, so that the next refresh certainly meets the restarted actor. Rank 0 appends
the actor's index version before the kill and after every epoch to ``mixnn-probe.jsonl`` in the run's output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from raynoisy.data.batch import Batch
from raynoisy.methods import register_method
from raynoisy.methods.base import MethodContext, call_service
from raynoisy.methods.mixnn import SERVICE, MixNN, MixNNParams

RESTART_TIMEOUT_S = 120  # a loaded 2-core machine restarts actors slowly


def _still_configured(handle: Any) -> bool:
    """Whether the old instance still answers (the kill is asynchronous) or the new one is not up yet."""
    try:
        return bool(ray.get(handle.configured.remote(), timeout=30))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return True


@dataclass
class MixNNProbeParams(MixNNParams):
    kill_index_at_step: int = -1  # global step (0-based) before which rank 0 kills the index actor


@register_method
class MixNNProbe(MixNN):
    name = "mixnn-probe"
    Params = MixNNProbeParams

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.steps = 0
        self.record = Path(ctx.cfg.run.output) / "mixnn-probe.jsonl"

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        if self.ctx.rank == 0 and self.steps == self.params.kill_index_at_step:
            self._kill_index()
        self.steps += 1
        return super().train_step(batch, trusted)

    def _kill_index(self) -> None:
        handle = self.ctx.services[SERVICE]
        version = call_service(handle, "version")
        assert version >= 0, "the drill kills an index that a refresh has built"
        ray.kill(handle, no_restart=False)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while _still_configured(handle):
            if time.monotonic() > deadline:
                raise AssertionError(f"the killed {SERVICE} actor was not restarted in {RESTART_TIMEOUT_S} s")
            time.sleep(0.2)
        self._write({"killed_at_step": self.steps, "version_before": version})

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        logged = super().on_epoch_end(epoch)
        if self.ctx.rank == 0:
            self._write({"epoch": epoch, "version": call_service(self.ctx.services[SERVICE], "version")})
        return logged

    def _write(self, entry: dict) -> None:
        with self.record.open("a") as f:
            f.write(json.dumps(entry) + "\n")
