"""The run's kNN index of training-sample features (FAISS), served as a Ray actor: see ``index.py``."""

from raynoisy.knn.checks import (
    DEFAULT_EXACT_THRESHOLD,
    METRICS,
    check_index_config,
    check_k,
    check_metric,
)
from raynoisy.knn.errors import IndexNotReadyError, NonFiniteFeaturesError
from raynoisy.knn.index import BuildSummary, KnnIndex

__all__ = [
    "DEFAULT_EXACT_THRESHOLD",
    "METRICS",
    "BuildSummary",
    "IndexNotReadyError",
    "KnnIndex",
    "NonFiniteFeaturesError",
    "check_index_config",
    "check_k",
    "check_metric",
]
