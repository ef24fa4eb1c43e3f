"""The class-conditional noise matrices of the issue-12 grid, written as CSV for ``noise.type matrix:PATH``.

Two Fashion-MNIST matrices with the structure real annotation noise has (a few dominant confusions per
class, rates that differ by class, ~0.4 overall), not the single-target ``flip``/``pair`` or the
every-class ``uniform`` protocols:

- ``fashion-mnist-annotator.csv``: the confusions a person labelling 28x28 thumbnails makes — tops among
  themselves (T-shirt, pullover, coat, shirt, dress), footwear among itself (sandal, sneaker, ankle boot),
  trousers and bags rarely. Confusions are mutual (shirt -> T-shirt and T-shirt -> shirt), so the wrong
  labels sit exactly where the classes are hardest to tell apart.
- ``fashion-mnist-sparse.csv``: seeded; each class keeps 1 - r_c of its labels, r_c drawn from [0.25, 0.55],
  and sends r_c to two other classes drawn at random, split 70/30. Structured like the first (a dominant
  confusion per class) but unrelated to what the images look like, so a model's own errors do not point at it.

    python benchmarks/noise_matrices.py benchmarks/noise     # writes both, prints each one's mean rate
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
# true class -> {given class: probability}; the rest of the row stays on the true class.
ANNOTATOR = {
    0: {6: 0.25, 3: 0.10, 2: 0.05},  # T-shirt/top -> shirt, dress, pullover
    1: {3: 0.20, 0: 0.05},  # trouser -> dress, T-shirt
    2: {4: 0.25, 6: 0.15, 0: 0.05},  # pullover -> coat, shirt, T-shirt
    3: {0: 0.20, 4: 0.10, 6: 0.10},  # dress -> T-shirt, coat, shirt
    4: {2: 0.30, 6: 0.10, 3: 0.05},  # coat -> pullover, shirt, dress
    5: {7: 0.25, 9: 0.10},  # sandal -> sneaker, ankle boot
    6: {0: 0.30, 2: 0.15, 4: 0.10},  # shirt -> T-shirt, pullover, coat
    7: {5: 0.20, 9: 0.20},  # sneaker -> sandal, ankle boot
    8: {0: 0.10, 4: 0.10},  # bag -> T-shirt, coat
    9: {7: 0.30, 5: 0.10},  # ankle boot -> sneaker, sandal
}


def annotator_matrix() -> np.ndarray:
    t = np.zeros((NUM_CLASSES, NUM_CLASSES))
    for true, confusions in ANNOTATOR.items():
        for given, p in confusions.items():
            t[true, given] = p
        t[true, true] = 1.0 - sum(confusions.values())
    return t


def sparse_matrix(seed: int = 12, low: float = 0.25, high: float = 0.55) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.zeros((NUM_CLASSES, NUM_CLASSES))
    for c in range(NUM_CLASSES):
        rate = rng.uniform(low, high)
        first, second = rng.choice([k for k in range(NUM_CLASSES) if k != c], size=2, replace=False)
        t[c, first], t[c, second], t[c, c] = 0.7 * rate, 0.3 * rate, 1.0 - rate
    return t


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in (("annotator", annotator_matrix()), ("sparse", sparse_matrix())):
        t = np.round(t, 6)
        t[np.diag_indices(NUM_CLASSES)] = 0.0
        t[np.diag_indices(NUM_CLASSES)] = 1.0 - t.sum(axis=1)  # rows sum to 1 at the written precision
        path = folder / f"fashion-mnist-{name}.csv"
        np.savetxt(path, t, fmt="%.6f", delimiter=",")
        print(f"{path}: mean noise rate {1 - np.trace(t) / NUM_CLASSES:.3f}")


if __name__ == "__main__":
    main()
