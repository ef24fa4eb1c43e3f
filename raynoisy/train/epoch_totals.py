"""What one epoch's steps logged, averaged as the epoch's ``train_*`` metrics.

One implementation for the Ray Train loop and the Ray-free harness (``walk_stages``), so that a run's
history holds the same per-epoch scalars whichever backend trained it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class EpochTotals:
    """What one (possibly resumed) epoch ran: steps, summed step scalars and their counts, its start time."""

    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(self, stats: dict[str, float]) -> None:
        self.steps += 1
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        """Each scalar's mean over the steps that logged it: a meta method with ``meta_every`` > 1 logs its
        ``meta_loss`` on meta-update steps only, and a mean over all steps would shrink it by k."""
        return {key: total / self.counts[key] for key, total in self.sums.items()}
