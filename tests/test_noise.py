"""Noise protocols: each realises its own published flip rate, matrices load strictly, seeds reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raynoisy.data.noise import (
    NOISE_TYPES,
    NoiseReport,
    NoiseSpec,
    actual_noise_rate,
    apply_noise,
    empirical_transition,
    transition_matrix,
)
from raynoisy.errors import ConfigError

K = 10
N = 100_000
RATE = 0.4


def _binomial_tol(p: float, n: int) -> float:
    """Five standard errors of a proportion: deterministic under a fixed seed, and a real check."""
    return 5 * np.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def true10() -> np.ndarray:
    return np.random.default_rng(123).integers(0, K, size=N)


def _noisy(
    true: np.ndarray, k: int, spec: NoiseSpec, seed: int = 7, dataset: str | None = None
) -> np.ndarray:
    return apply_noise(true, k, spec, np.random.default_rng(seed), dataset=dataset)


def _off_diagonal_targets(true: np.ndarray, given: np.ndarray, k: int) -> dict[int, set[int]]:
    """For each true class, the set of wrong labels it was turned into."""
    wrong = given != true
    return {c: set(np.unique(given[wrong & (true == c)]).tolist()) for c in range(k)}


# --- NoiseSpec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [t for t in NOISE_TYPES if t != "matrix"])
def test_parse_named_types(kind: str) -> None:
    assert NoiseSpec.parse(f" {kind.upper()} ", 0.3) == NoiseSpec(kind, 0.3)


def test_parse_matrix_keeps_everything_after_first_colon() -> None:
    spec = NoiseSpec.parse("matrix:C:/noise/T.npy", 0.0)
    assert spec == NoiseSpec("matrix", 0.0, "C:/noise/T.npy")


@pytest.mark.parametrize("text", ["gaussian", "sym", "uniform:foo", "matrix", "matrix:"])
def test_parse_rejects_bad_type(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        NoiseSpec.parse(text, 0.2)
    assert err.value.field == "noise.type"


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), True, "0.2"])
def test_parse_rejects_rate_outside_unit_interval(rate: object) -> None:
    with pytest.raises(ConfigError) as err:
        NoiseSpec.parse("uniform", rate)  # type: ignore[arg-type]
    assert err.value.field == "noise.rate"
    assert str(err.value).startswith("noise.rate: ")


# --- actual rates per protocol -------------------------------------------------------------------------


def test_none_is_identity(true10: np.ndarray) -> None:
    assert np.array_equal(_noisy(true10, K, NoiseSpec("none")), true10)
    assert np.array_equal(transition_matrix(NoiseSpec("none"), K), np.eye(K))


def test_uniform_rate_is_p_times_one_minus_one_over_k(true10: np.ndarray) -> None:
    given = _noisy(true10, K, NoiseSpec("uniform", RATE))
    expected = RATE * (1 - 1 / K)  # 0.36: the true class can be redrawn
    assert abs(actual_noise_rate(true10, given) - expected) < _binomial_tol(expected, N)
    emp = empirical_transition(true10, given, K)
    t = transition_matrix(NoiseSpec("uniform", RATE), K)
    assert np.allclose(t.sum(axis=1), 1.0)
    assert np.abs(emp - t).max() < 0.02


def test_symmetric_moves_exactly_r_of_every_class(true10: np.ndarray) -> None:
    given = _noisy(true10, K, NoiseSpec("symmetric", RATE))
    for c in range(K):
        of_c = true10 == c
        n_c = int(of_c.sum())
        moved = int((given[of_c] != c).sum())
        assert moved == int(np.floor(RATE * n_c + 0.5))
        # Spread over the other classes as evenly as integer counts allow (MetaLabelNet's exact counts).
        per_target = np.bincount(given[of_c & (given != c)], minlength=K)
        others = np.delete(per_target, c)
        assert others.max() - others.min() <= 1
        assert per_target[c] == 0
    assert abs(actual_noise_rate(true10, given) - RATE) < 1e-4


def test_symmetric_rounds_half_up_on_small_classes() -> None:
    true = np.repeat(np.arange(3), [5, 3, 1])  # 0.5 * (5, 3, 1) = 2.5, 1.5, 0.5 -> 3, 2, 1
    given = _noisy(true, 3, NoiseSpec("symmetric", 0.5))
    assert [int((given[true == c] != c).sum()) for c in range(3)] == [3, 2, 1]


def test_flip_maps_each_class_to_one_other_class(true10: np.ndarray) -> None:
    spec = NoiseSpec("flip", RATE)
    given = _noisy(true10, K, spec, seed=3)
    t = transition_matrix(spec, K, rng=np.random.default_rng(3))  # the map apply_noise drew first
    targets = _off_diagonal_targets(true10, given, K)
    for c in range(K):
        off = np.flatnonzero((t[c] > 0) & (np.arange(K) != c))
        assert off.size == 1 and targets[c] == {int(off[0])}
        rate_c = np.mean(given[true10 == c] != c)
        assert abs(rate_c - RATE) < _binomial_tol(RATE, int((true10 == c).sum()))
    assert abs(actual_noise_rate(true10, given) - RATE) < _binomial_tol(RATE, N)


def test_flip_map_is_not_forced_to_be_a_permutation() -> None:
    # GLC/MW-Net draw each class's target independently, so two classes can share one target.
    maps = [
        np.argmax(
            transition_matrix(NoiseSpec("flip", 0.5), K, rng=np.random.default_rng(s)) - np.eye(K), axis=1
        )
        for s in range(20)
    ]
    assert any(len(set(m.tolist())) < K for m in maps)
    assert all((m != np.arange(K)).all() for m in maps)


def test_flip_without_rng_is_an_error() -> None:
    with pytest.raises(ValueError, match="rng"):
        transition_matrix(NoiseSpec("flip", 0.2), K)


def test_pair_cifar10_map_and_rates(true10: np.ndarray) -> None:
    given = _noisy(true10, K, NoiseSpec("pair", RATE), dataset="cifar10")
    expected = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    targets = _off_diagonal_targets(true10, given, K)
    for c in range(K):
        of_c = true10 == c
        if c in expected:
            assert targets[c] == {expected[c]}
            assert abs(np.mean(given[of_c] != c) - RATE) < _binomial_tol(RATE, int(of_c.sum()))
        else:
            assert np.array_equal(given[of_c], true10[of_c]), f"class {c} must stay clean"
    share = np.isin(true10, list(expected)).mean()
    assert abs(actual_noise_rate(true10, given) - RATE * share) < _binomial_tol(RATE * share, N)


def test_pair_cifar100_cycles_within_groups_of_five() -> None:
    true = np.random.default_rng(5).integers(0, 100, size=N)
    given = _noisy(true, 100, NoiseSpec("pair", RATE), dataset="CIFAR-100")
    targets = _off_diagonal_targets(true, given, 100)
    for c in range(100):
        assert targets[c] == {5 * (c // 5) + (c + 1) % 5}
    assert targets[4] == {0} and targets[99] == {95}
    assert abs(actual_noise_rate(true, given) - RATE) < _binomial_tol(RATE, N)


def test_pair_generic_is_next_class() -> None:
    true = np.random.default_rng(6).integers(0, 7, size=N)
    given = _noisy(true, 7, NoiseSpec("pair", RATE), dataset="clothing1m")
    assert _off_diagonal_targets(true, given, 7) == {c: {(c + 1) % 7} for c in range(7)}
    assert abs(actual_noise_rate(true, given) - RATE) < _binomial_tol(RATE, N)


def test_pair_dataset_with_wrong_class_count_fails() -> None:
    with pytest.raises(ConfigError, match="needs 10 classes"):
        transition_matrix(NoiseSpec("pair", RATE), 12, dataset="cifar10")


@pytest.mark.parametrize("kind", ["symmetric", "flip", "pair"])
def test_single_class_cannot_move_labels(kind: str) -> None:
    with pytest.raises(ConfigError, match="only 1"):
        apply_noise(np.zeros(5, dtype=np.int64), 1, NoiseSpec(kind, 0.3), np.random.default_rng(0))


def test_unknown_true_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        apply_noise(np.array([0, -1, 3]), K, NoiseSpec("uniform", 0.2), np.random.default_rng(0))


# --- matrix files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_t() -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.dirichlet(np.full(K, 0.5), size=K) * 0.5 + 0.5 * np.eye(K)


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_matrix_reproduces_the_file(
    tmp_path: Path, random_t: np.ndarray, true10: np.ndarray, suffix: str
) -> None:
    path = tmp_path / f"T{suffix}"
    if suffix == ".npy":
        np.save(path, random_t)
    else:
        np.savetxt(path, random_t, delimiter=",")
    spec = NoiseSpec.parse(f"matrix:{path}", 0.0)
    assert np.allclose(transition_matrix(spec, K), random_t)
    given = _noisy(true10, K, spec)
    emp = empirical_transition(true10, given, K)
    n_c = np.bincount(true10, minlength=K)[:, None]
    std_err = np.sqrt(random_t * (1 - random_t) / n_c)
    assert (np.abs(emp - random_t) < 4 * std_err + 1e-12).all()


def test_zero_mass_entries_are_never_drawn(tmp_path: Path) -> None:
    t = np.zeros((3, 3))
    t[0, 2] = t[1, 0] = 1.0
    t[2, 1] = t[2, 2] = 0.5
    np.save(tmp_path / "T.npy", t)
    true = np.random.default_rng(0).integers(0, 3, size=10_000)
    given = _noisy(true, 3, NoiseSpec("matrix", matrix_path=str(tmp_path / "T.npy")))
    assert (given[true == 0] == 2).all() and (given[true == 1] == 0).all()
    assert set(np.unique(given[true == 2]).tolist()) == {1, 2}


def _write(path: Path, content: np.ndarray | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif path.suffix == ".npy":
        np.save(path, content)
    else:
        np.savetxt(path, content, delimiter=",")
    return path


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("rect.npy", np.full((3, 4), 0.25), "not a square matrix"),
        ("vec.csv", b"0.5,0.5\n", "not a square matrix"),
        ("small.npy", np.eye(3), "has 10 classes"),
        ("neg.csv", np.eye(K) * 1.5 - 0.5 * np.roll(np.eye(K), 1, axis=1), "negative entry"),
        ("sum.npy", np.eye(K) * 0.9, "row 0 sums to 0.9"),
        ("nan.npy", np.where(np.eye(K) > 0, np.nan, 0.0), "NaN"),
        ("junk.npy", b"this is not numpy", "cannot be read"),
        ("text.csv", b"a,b\nc,d\n", "cannot be read"),
        ("T.txt", np.eye(K), "unsupported extension"),
    ],
)
def test_malformed_matrix_files_name_the_file(
    tmp_path: Path, name: str, content: object, problem: str
) -> None:
    path = _write(tmp_path / name, content)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        transition_matrix(NoiseSpec("matrix", matrix_path=str(path)), K)
    assert err.value.field == "noise.type"
    assert f"matrix file {path}:" in str(err.value)
    assert problem in str(err.value)


def test_a_csv_rounded_to_six_decimals_is_accepted_and_renormalised(tmp_path: Path) -> None:
    t = np.full((K, K), 0.4 / (K - 1)) + np.eye(K) * (0.6 - 0.4 / (K - 1))
    path = tmp_path / "rounded.csv"
    np.savetxt(path, t, fmt="%.6f", delimiter=",")  # 0.044444 x 9 + 0.600000: rows sum to 0.999996
    assert abs(np.loadtxt(path, delimiter=",").sum(axis=1) - 1).max() > 1e-6
    loaded = transition_matrix(NoiseSpec("matrix", matrix_path=str(path)), K)
    np.testing.assert_allclose(loaded.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(loaded, t, atol=1e-5)


def test_missing_matrix_file_names_the_file(tmp_path: Path, true10: np.ndarray) -> None:
    path = tmp_path / "absent.npy"
    with pytest.raises(ConfigError, match=f"matrix file {path}: cannot be read"):
        _noisy(true10, K, NoiseSpec("matrix", matrix_path=str(path)))


# --- determinism ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "symmetric", "flip", "pair"])
def test_same_seed_same_labels_different_seed_different(true10: np.ndarray, kind: str) -> None:
    spec = NoiseSpec(kind, 0.3)
    first = _noisy(true10, K, spec, seed=1)
    assert np.array_equal(first, _noisy(true10, K, spec, seed=1))
    assert not np.array_equal(first, _noisy(true10, K, spec, seed=2))


# --- measurement and report ----------------------------------------------------------------------------


def test_empirical_transition_leaves_absent_classes_zero() -> None:
    emp = empirical_transition(np.array([0, 0, 0, 1, -1]), np.array([0, 2, 2, 1, 0]), 3)
    assert np.allclose(emp, [[1 / 3, 0, 2 / 3], [0, 1, 0], [0, 0, 0]])


def test_actual_rate_ignores_unknown_true_labels() -> None:
    assert actual_noise_rate(np.array([0, 1, -1, -1]), np.array([0, 2, 5, 5])) == 0.5
    assert np.isnan(actual_noise_rate(np.array([-1, -1]), np.array([0, 1])))


def test_report_is_strict_json(true10: np.ndarray) -> None:
    spec = NoiseSpec("uniform", RATE)
    given = _noisy(true10, K, spec)
    report = NoiseReport.from_labels(spec, true10, given, K, transition_matrix(spec, K))
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["type"] == "uniform" and data["rate"] == RATE
    assert abs(data["actual_rate"] - 0.36) < 0.01
    assert np.allclose(data["transition"], transition_matrix(spec, K))
    assert len(data["empirical"]) == K and len(data["empirical"][0]) == K

    natural = NoiseReport.from_labels(NoiseSpec("none"), np.full(3, -1), np.array([0, 1, 2]), 3)
    assert natural.to_dict()["actual_rate"] is None and natural.to_dict()["transition"] is None
