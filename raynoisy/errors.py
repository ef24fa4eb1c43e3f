"""Errors a user can act on: each carries the field or file at fault and how to fix it.

They cross process boundaries: a worker raises one, Ray pickles it to the driver, and the CLI prints it as
one line with exit code 2. An exception whose ``__init__`` takes other arguments than the message does not
unpickle by default (Python rebuilds it from ``args``, the message alone), so the user would see a
TypeError instead; every class here rebuilds itself from its own arguments in ``__reduce__``.
"""

from __future__ import annotations

from typing import Any


class RaynoisyError(Exception):
    """Base class for errors that the CLI turns into one line and exit code 2.

    Deterministic: the same input raises it again, so the trainer does not retry a worker that raised one.
    """

    def __init__(self, message: str, *init_args: Any) -> None:
        super().__init__(message)
        self._init_args = init_args or (message,)

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return type(self), self._init_args


class ConfigError(RaynoisyError):
    """A config value is invalid; ``field`` is the dotted path, ``fix`` says what to do instead."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem}; {fix}", field, problem, fix)


class DataFormatError(RaynoisyError):
    """A data file is malformed; the message names the file and, where it applies, the line."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        self.path, self.problem, self.line = path, problem, line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}", path, problem, line)


class TooManyBadSamplesError(RaynoisyError):
    """More samples were unreadable than the configured fraction allows."""


class TrainingDivergedError(RaynoisyError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, epoch: int, step: int, loss: float) -> None:
        self.epoch, self.step, self.loss = epoch, step, loss
        super().__init__(
            f"training diverged: loss {loss} at epoch {epoch} step {step}; the last good checkpoint is kept. "
            "Lower --lr (or the method's meta_lr), or check the data",
            epoch,
            step,
            loss,
        )
