"""The run's Ray actors: the method's services and the run's own control actor.

The driver starts every service before the trainer, named in a namespace of the run's own, owned by the
driver (so they outlive a restart of the worker group, and die with the driver if it is killed), restarted
by Ray if they die, and kills them when the run ends or fails. Workers get the handles through the
training config and reach them as ``ctx.services[name]``.

``RunControl`` is the one service every run has. A worker that raises a ``RaynoisyError`` (a bad config
value, a malformed file, a diverged loss) records it there before it fails: the error is deterministic, so
the restarted worker group finds it recorded and stops at once instead of training again, and the driver
raises it, intact, to the user. Ray Train V2 has no public way to mark a worker error as not retryable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from raynoisy.errors import RaynoisyError
from raynoisy.methods.base import ServiceSpec

CONTROL = "run-control"


class RunControl:
    """Holds the deterministic error that ended the run, if any."""

    def __init__(self) -> None:
        self._error: RaynoisyError | None = None

    def record(self, error: RaynoisyError) -> None:
        if self._error is None:
            self._error = error

    def error(self) -> RaynoisyError | None:
        return self._error


def namespace_of(run_name: str) -> str:
    return f"raynoisy-{run_name}"


@contextmanager
def running_services(run_name: str, specs: list[ServiceSpec]) -> Iterator[dict[str, Any]]:
    """Start ``specs`` and the run's control actor; yield their handles by name; kill them all on exit."""
    namespace = namespace_of(run_name)
    handles: dict[str, Any] = {}
    try:
        for spec in [ServiceSpec(CONTROL, RunControl), *specs]:
            if spec.name in handles:
                raise ValueError(f"two services of the run are named {spec.name!r}")
            actor = ray.remote(spec.actor_class).options(
                name=spec.name,
                namespace=namespace,
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                max_concurrency=spec.max_concurrency,
                max_restarts=-1,
                max_task_retries=-1,
            )
            handles[spec.name] = actor.remote(**spec.kwargs)
        yield handles
    finally:
        for handle in handles.values():
            ray.kill(handle, no_restart=True)


def recorded_error(handles: dict[str, Any]) -> RaynoisyError | None:
    """The deterministic error a worker recorded, or None."""
    return ray.get(handles[CONTROL].error.remote())


def record_error(handles: dict[str, Any], error: RaynoisyError) -> None:
    ray.get(handles[CONTROL].record.remote(error))
