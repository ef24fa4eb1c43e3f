"""Errors a user can act on: each carries the field or file at fault and how to fix it."""

from __future__ import annotations


class RaynoisyError(Exception):
    """Base class for errors that the CLI turns into one line and exit code 2."""


class ConfigError(RaynoisyError):
    """A config value is invalid; ``field`` is the dotted path, ``fix`` says what to do instead."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem}; {fix}")


class DataFormatError(RaynoisyError):
    """A data file is malformed; the message names the file and, where it applies, the line."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        self.path, self.problem, self.line = path, problem, line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")


class TooManyBadSamplesError(RaynoisyError):
    """More samples were unreadable than the configured fraction allows."""
