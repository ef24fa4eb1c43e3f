"""Checks of a kNN index's settings, as pure functions, so that the method owning the index runs them in its
``check_config`` before Ray starts (one clear line naming the field), and the index runs them again when
it is constructed.

    from raynoisy.knn import check_index_config
    check_index_config(k=params.k, num_samples=num_train, metric=params.metric, prefix="method.params")
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from raynoisy.errors import ConfigError

METRICS = ("cosine", "l2")
STORAGE_DTYPES = ("float32", "float16")
DEFAULT_EXACT_THRESHOLD = 50_000


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, field: str, *, minimum: int, fix: str) -> int:
    if not _is_int(value):
        raise ConfigError(field, f"must be an integer, got {value!r}", fix)
    if value < minimum:
        raise ConfigError(field, f"is {value}, below the minimum of {minimum}", fix)
    return int(value)


def check_num_samples(num_samples: Any, field: str = "num_samples", *, exclude_self: bool = True) -> int:
    """The index needs at least one sample, and two when a sample's neighbours exclude itself."""
    least = 2 if exclude_self else 1
    n = check_int(num_samples, field, minimum=0, fix="pass the number of training samples")
    if n < least:
        raise ConfigError(
            field,
            f"the training set has {n} sample{'s' if n != 1 else ''}, too few for a neighbour other than "
            "itself"
            if exclude_self
            else "the training set is empty",
            "train on more samples, or do without the kNN index",
        )
    return n


def check_k(k: Any, num_samples: int, field: str = "method.params.k", *, exclude_self: bool = True) -> int:
    """1 <= k, and k below the training set's size (a sample has ``num_samples - 1`` others)."""
    if not _is_int(k):
        raise ConfigError(field, f"must be an integer number of neighbours, got {k!r}", "set e.g. 10")
    if k < 1:
        raise ConfigError(field, f"is {k}; at least one neighbour is needed", "set k >= 1 (e.g. 10)")
    limit = num_samples - 1 if exclude_self else num_samples
    if k > limit:
        others = "other than itself " if exclude_self else ""
        raise ConfigError(
            field,
            f"is {k}, but the training set has {num_samples:,} samples, so a sample has at most {limit:,} "
            f"neighbours {others}",
            f"set {field.rsplit('.', 1)[-1]} <= {limit:,} (neighbour methods use 1-20)",
        )
    return int(k)


def check_metric(metric: Any, field: str = "method.params.metric") -> str:
    if metric not in METRICS:
        raise ConfigError(field, f"unknown metric {metric!r}", f"use one of {list(METRICS)}")
    return str(metric)


def check_dim(dim: Any, field: str = "dim") -> int:
    return check_int(dim, field, minimum=1, fix="pass the feature width of the model's embedding")


def check_exact_threshold(value: Any, field: str = "method.params.exact_threshold") -> int:
    return check_int(
        value,
        field,
        minimum=0,
        fix=f"set the training-set size from which the index is approximate ({DEFAULT_EXACT_THRESHOLD:,})",
    )


def check_use_gpu(value: Any, field: str = "method.params.use_gpu") -> bool | str:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ConfigError(
        field, f"must be 'auto', true or false, got {value!r}", "use 'auto' (GPU when the actor has one)"
    )


def check_storage_dtype(value: Any, field: str = "storage_dtype") -> str:
    if value not in STORAGE_DTYPES:
        raise ConfigError(field, f"unknown storage dtype {value!r}", f"use one of {list(STORAGE_DTYPES)}")
    return str(value)


def check_target_recall(value: Any, field: str = "target_recall") -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0.0 < value <= 1.0:
        raise ConfigError(field, f"must be a number in (0, 1], got {value!r}", "set e.g. 0.95")
    return float(value)


def check_index_config(
    *,
    k: Any,
    num_samples: Any,
    dim: Any = None,
    metric: Any = "cosine",
    exact_threshold: Any = DEFAULT_EXACT_THRESHOLD,
    use_gpu: Any = "auto",
    exclude_self: bool = True,
    prefix: str = "method.params",
) -> None:
    """Every check a method owning a ``KnnIndex`` runs before Ray starts; fields are named ``prefix.<name>``.

    ``num_samples`` is the training split's size (not a config field: the message names ``k``'s bound).
    """
    n = check_num_samples(num_samples, f"{prefix}.k", exclude_self=exclude_self)
    check_k(k, n, f"{prefix}.k", exclude_self=exclude_self)
    if dim is not None:
        check_dim(dim, f"{prefix}.dim")
    check_metric(metric, f"{prefix}.metric")
    check_exact_threshold(exact_threshold, f"{prefix}.exact_threshold")
    check_use_gpu(use_gpu, f"{prefix}.use_gpu")
