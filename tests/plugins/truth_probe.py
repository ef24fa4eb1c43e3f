"""MLC with a record of the true labels it is handed, registered through ``method.module=truth_probe``.

Every training step, trusted batch, whole-split pass and per-sample export records the largest true label
it sees; the Ray test asserts it is always -1 (unknown): a label kept only to measure label quality never
reaches a method, wherever the data comes from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from raynoisy.data.batch import Batch
from raynoisy.methods import register_method
from raynoisy.methods.base import MethodContext
from raynoisy.methods.mlc import MetaLabelCorrection


def _largest(batch: Batch | None) -> int:
    return -1 if batch is None or len(batch) == 0 else int(batch.true_y.max())


@register_method
class TruthProbe(MetaLabelCorrection):
    name = "mlc-truth-probe"

    def __init__(self, ctx: MethodContext) -> None:
        self.seen: dict[str, int] = {}
        self.record = Path(ctx.cfg.run.output) / f"truth-probe-rank{ctx.rank}.txt"
        assert ctx.iter_split is not None
        passes = ctx.iter_split

        def recorded(split: str) -> Iterator[Batch]:
            for batch in passes(split):
                self._see(f"pass:{split}", batch)
                yield batch

        ctx.iter_split = recorded
        super().__init__(ctx)

    def _see(self, where: str, batch: Batch | None) -> None:
        self.seen[where] = max(self.seen.get(where, -1), _largest(batch))
        self.record.write_text("".join(f"{k} {v}\n" for k, v in sorted(self.seen.items())))

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        self._see("train_step", batch)
        if trusted is not None:
            self._see("trusted", trusted)
        return super().train_step(batch, trusted)

    def per_sample_outputs(self, batch: Batch) -> dict[str, np.ndarray]:
        self._see("export", batch)
        return super().per_sample_outputs(batch)

    def label_issue_columns(self, batch: Batch) -> dict[str, np.ndarray] | None:
        # Called on every export batch, also where a guard that ended falling back skips the method's own
        # per-sample outputs (its labels then come from the model's predictions on the same batches).
        self._see("export", batch)
        return super().label_issue_columns(batch)
