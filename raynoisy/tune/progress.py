"""What a person watching a sweep sees: one line per trial that starts, finishes or fails, with the count
done, the test accuracy and the sweep's ETA (Tune's own status table is off)."""

from __future__ import annotations

import math
import time

from ray.tune import Callback

from raynoisy.train.progress import duration
from raynoisy.tune.trial import TRIAL


def say(text: str) -> None:
    """A line of the sweep's progress, flushed at once (the sweep is often run with its output in a file)."""
    print(text, flush=True)


class SweepProgress(Callback):
    """Tune callback printing a line per trial event of this invocation's ``total`` trials.

    Lines go to ``print`` at call time: Tune pickles its callbacks with the experiment state, and the
    ``print`` Ray installs in a driver does not pickle, so the callback holds no function.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.finished, self.failed = 0, 0
        self.start = time.time()

    def _eta(self) -> str:
        done = self.finished + self.failed
        if done == 0:
            return "?"
        return duration((time.time() - self.start) / done * (self.total - done))

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        say(f"[sweep] started {trial.config[TRIAL]}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        result = trial.last_result or {}
        accuracy, wall = result.get("test_accuracy", math.nan), result.get("wall_seconds", math.nan)
        say(
            f"[sweep] finished {trial.config[TRIAL]}: test accuracy {accuracy:.4f} in {wall:.0f} s; "
            f"{self.finished + self.failed}/{self.total} done, {self.failed} failed, eta {self._eta()}"
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        say(
            f"[sweep] FAILED {trial.config[TRIAL]} (error in its run folder's error.json); "
            f"{self.finished + self.failed}/{self.total} done, {self.failed} failed, eta {self._eta()}"
        )
