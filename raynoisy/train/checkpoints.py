"""Writing and restoring a rank's part of a checkpoint (the files are listed in ``run_files``).

Every rank calls ``report``: it is Ray Train's barrier and the checkpoint directory is shared by name, so
rank 0's state files and every rank's block of the per-sample store land in one checkpoint.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import ray.train
import torch

from raynoisy.data.sample_store import SampleStore
from raynoisy.methods.base import Method
from raynoisy.train.run_files import (
    BEST_MODEL_FILE,
    STAGE_BEST_MODEL_FILE,
    STATE_FILE,
    LoopState,
    rng_state,
    set_rng_state,
)
from raynoisy.train.selection import Selection


class Checkpoints:
    """One rank's view of the run's checkpoints."""

    def __init__(
        self,
        method: Method,
        store: SampleStore,
        selection: Selection,
        rank: int,
        world_size: int,
        device: torch.device,
    ) -> None:
        self.method, self.store, self.selection = method, store, selection
        self.rank, self.world_size, self.device = rank, world_size, device

    def restore(self) -> LoopState | None:
        """The loop state of the latest checkpoint, with method, store, best models and RNG restored."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            folder = Path(d)
            state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=False)
            self.selection.best = _load_optional(folder / BEST_MODEL_FILE)
            self.selection.stage_best = _load_optional(folder / STAGE_BEST_MODEL_FILE)
            self.store.load(folder)
        self.method.load_state_dict(state["method"])
        set_rng_state(state["rng"])
        return LoopState(**state["loop"])

    def report(
        self, metrics: dict, state: LoopState, extra_files: Callable[[Path], None] | None = None
    ) -> None:
        """Report ``metrics`` with a checkpoint of everything needed to resume at ``state``."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            self.store.save(folder, self.rank, self.world_size)
            if self.rank == 0:
                torch.save(
                    {"method": self.method.state_dict(), "loop": asdict(state), "rng": rng_state()},
                    folder / STATE_FILE,
                )
                for name, model in (
                    (BEST_MODEL_FILE, self.selection.best),
                    (STAGE_BEST_MODEL_FILE, self.selection.stage_best),
                ):
                    if model is not None:
                        torch.save(model, folder / name)
                if extra_files is not None:
                    extra_files(folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _load_optional(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
