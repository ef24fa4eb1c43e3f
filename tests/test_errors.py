"""Every RaynoisyError survives pickling: Ray carries a worker's error to the driver, which prints it.

An exception whose ``__init__`` takes other arguments than the message does not unpickle by default, so the
user would see a TypeError instead of the error. The classes are discovered, not listed, so a new subclass
without sample arguments below fails this file until it gets some (and with them, a round-trip check).
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pytest

import raynoisy.train.driver  # noqa: F401 - imported so that subclasses defined in the training code are found
from raynoisy.data.sample_store import SampleStoreCheckpointError
from raynoisy.errors import (
    ConfigError,
    DataFormatError,
    RaynoisyError,
    TooManyBadSamplesError,
    TrainingDivergedError,
)
from raynoisy.knn.errors import NonFiniteFeaturesError

# Sample constructor arguments per class, as the code raising it would pass them (positional).
SAMPLE_ARGS: dict[type[RaynoisyError], list[tuple[Any, ...]]] = {
    RaynoisyError: [("something a user can fix",)],
    ConfigError: [("optim.lr", "must be > 0, got -1.0", "pass a positive --lr")],
    DataFormatError: [
        ("/data/clothing1m/noisy_label_kv.txt", "expected 'key label'", 17),
        ("/data/list.csv", "no header row", None),
    ],
    TooManyBadSamplesError: [("12 of 1000 samples unreadable (1.2% > data.max_bad_fraction 1%)",)],
    TrainingDivergedError: [(3, 1200, math.nan), (0, 7, math.inf)],
    SampleStoreCheckpointError: [("/runs/a/checkpoint_000002: rank 1 of 2 missing",)],
    NonFiniteFeaturesError: [(3, np.array([17, 4_000_000_001]))],
}


def raynoisy_error_classes() -> list[type[RaynoisyError]]:
    """RaynoisyError and every subclass the package defines, found by walking ``__subclasses__``."""
    found, todo = [], [RaynoisyError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("raynoisy.") and cls not in found:  # not test-local subclasses
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: cls.__qualname__)


def samples() -> list[RaynoisyError]:
    return [cls(*args) for cls in raynoisy_error_classes() for args in SAMPLE_ARGS.get(cls, [])]


def same(a: Any, b: Any) -> bool:
    """Equality in which NaN equals NaN (a diverged loss is NaN), element-wise for tuples."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def assert_same_error(copy: BaseException, original: RaynoisyError) -> None:
    assert type(copy) is type(original)
    assert str(copy) == str(original)
    assert same(copy.args, original.args)
    assert vars(copy).keys() == vars(original).keys()
    for name, value in vars(original).items():
        assert same(getattr(copy, name), value), name


def test_discovery_covers_the_known_classes_and_each_has_sample_arguments():
    classes = raynoisy_error_classes()
    assert set(SAMPLE_ARGS) <= set(classes)  # the walk finds at least the classes this file knows
    missing = [f"{cls.__module__}.{cls.__qualname__}" for cls in classes if not SAMPLE_ARGS.get(cls)]
    assert not missing, f"add sample constructor arguments to SAMPLE_ARGS for {missing}"


@pytest.mark.parametrize("error", samples(), ids=lambda e: f"{type(e).__name__}")
def test_pickle_round_trip_keeps_type_message_and_attributes(error):
    assert_same_error(pickle.loads(pickle.dumps(error)), error)
    # The highest protocol is what Ray's serializer uses; the default one is what multiprocessing uses.
    assert_same_error(pickle.loads(pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL)), error)


def test_specific_attributes_survive():
    config = pickle.loads(pickle.dumps(ConfigError("optim.lr", "nan is not finite", "pass --lr 0.1")))
    assert (config.field, config.problem, config.fix) == ("optim.lr", "nan is not finite", "pass --lr 0.1")
    data = pickle.loads(pickle.dumps(DataFormatError("a.txt", "bad row", 3)))
    assert (data.path, data.problem, data.line, str(data)) == ("a.txt", "bad row", 3, "a.txt:3: bad row")
    diverged = pickle.loads(pickle.dumps(TrainingDivergedError(2, 40, math.inf)))
    assert (diverged.epoch, diverged.step, diverged.loss) == (2, 40, math.inf)


def _raise(error: BaseException) -> None:
    raise error


def test_errors_cross_a_real_process_boundary():
    """A child process raises each sample; the parent gets the same error back (pickled both ways)."""
    errors = samples()
    # fork: the child starts in milliseconds with this module already imported (spawn would re-import torch).
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_raise, error) for error in errors]
        for future, error in zip(futures, errors, strict=True):
            copy = future.exception(timeout=60)
            assert copy is not None
            assert_same_error(copy, error)
