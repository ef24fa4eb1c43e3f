"""The miniatures stand in for the real sets: official layout, realistic noise, cheap to rebuild or reuse."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from raynoisy.data.miniature import (
    CLOTHING1M_CLASSES,
    TRUTH_FILE,
    build_miniature_clothing1m,
    build_miniature_webvision,
)

OFFICIAL_FILES = [
    "category_names_eng.txt",
    "noisy_label_kv.txt",
    "clean_label_kv.txt",
    "noisy_train_key_list.txt",
    "clean_train_key_list.txt",
    "clean_val_key_list.txt",
    "clean_test_key_list.txt",
]

CORRUPT = 3


@pytest.fixture(scope="module")
def default_tree(tmp_path_factory) -> Path:
    """The default tree, with three garbage JPEGs (writing trees dominates this file's run time)."""
    return build_miniature_clothing1m(tmp_path_factory.mktemp("clothing1m"), corrupt=CORRUPT)


def read_kv(path: Path) -> dict[str, int]:
    return {key: int(label) for key, label in (line.split() for line in path.read_text().splitlines())}


def read_list(path: Path) -> list[str]:
    return path.read_text().split()


def test_default_tree_has_the_official_layout(default_tree):
    for name in OFFICIAL_FILES:
        assert (default_tree / name).is_file()
    assert read_list(default_tree / "category_names_eng.txt")[:2] == ["T-Shirt", "Shirt"]
    jpegs = sorted(default_tree.glob("images/*/*/*.jpg"))
    assert len(jpegs) == 14 * 150
    with Image.open(jpegs[0]) as image:
        assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"
    lists = {name: read_list(default_tree / name) for name in OFFICIAL_FILES[3:]}
    keys = [key for listed in lists.values() for key in listed]
    assert len(keys) == len(set(keys)) == len(jpegs)
    assert all((default_tree / key).is_file() for key in keys[:50])


def test_clean_sets_cover_every_class(default_tree):
    clean = read_kv(default_tree / "clean_label_kv.txt")
    for name, minimum in (("clean_train", 15), ("clean_val", 8), ("clean_test", 15)):
        per_class = Counter(clean[key] for key in read_list(default_tree / f"{name}_key_list.txt"))
        assert sorted(per_class) == list(range(14)) and min(per_class.values()) >= minimum, name
    noisy = read_list(default_tree / "noisy_train_key_list.txt")
    assert len(noisy) > 0.6 * 14 * 150


def test_noisy_labels_are_wrong_at_a_realistic_class_dependent_rate(default_tree):
    noisy = read_kv(default_tree / "noisy_label_kv.txt")
    assert set(noisy) == set(read_list(default_tree / "noisy_train_key_list.txt"))
    truth = read_kv(default_tree / TRUTH_FILE)
    wrong = [(truth[key], label) for key, label in noisy.items() if label != truth[key]]
    assert 0.30 <= len(wrong) / len(noisy) <= 0.45
    most_confused = {
        true: Counter(given for t, given in wrong if t == true).most_common(1)[0][0] for true in range(14)
    }
    names = {CLOTHING1M_CLASSES[t]: CLOTHING1M_CLASSES[g] for t, g in most_confused.items()}
    assert names["Knitwear"] == "Sweater" and names["Sweater"] == "Knitwear"
    assert names["Windbreaker"] == names["Downcoat"] == "Jacket" and names["Jacket"] == "Windbreaker"
    assert names["Shirt"] == "T-Shirt" and names["Chiffon"] == "Dress" and names["Hoodie"] == "Sweater"


def test_clean_labels_are_true_and_some_noisy_images_have_one(default_tree):
    clean = read_kv(default_tree / "clean_label_kv.txt")
    truth = read_kv(default_tree / TRUTH_FILE)
    assert all(truth[key] == label for key, label in clean.items())
    overlap = set(clean) & set(read_list(default_tree / "noisy_train_key_list.txt"))
    assert 0.05 * 14 * 150 * 0.7 < len(overlap) < 0.2 * 14 * 150


def test_second_build_reuses_the_tree(default_tree):
    image = next(default_tree.glob("images/*/*/*.jpg"))
    before = image.stat().st_mtime_ns, (default_tree / "noisy_label_kv.txt").read_text()
    assert build_miniature_clothing1m(default_tree, corrupt=CORRUPT) == default_tree
    assert (image.stat().st_mtime_ns, (default_tree / "noisy_label_kv.txt").read_text()) == before


def test_an_interrupted_build_is_redone(tmp_path):
    root = build_miniature_clothing1m(tmp_path, images_per_class=60, image_size=8)
    stamp = json.loads((root / ".miniature.json").read_text())
    (root / ".miniature.json").write_text(json.dumps({**stamp, "complete": False}))
    (root / "clean_test_key_list.txt").unlink()
    build_miniature_clothing1m(root, images_per_class=60, image_size=8)
    assert (root / "clean_test_key_list.txt").is_file()
    assert len(list(root.glob("images/*/*/*.jpg"))) == 14 * 60


def test_a_folder_not_built_here_is_never_overwritten(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_miniature_clothing1m(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_corrupt_images_are_noisy_train_garbage(default_tree):
    noisy = set(read_list(default_tree / "noisy_train_key_list.txt"))
    broken = []
    for path in default_tree.glob("images/*/*/*.jpg"):
        try:
            with Image.open(path) as image:
                image.load()
        except OSError:
            broken.append(path.relative_to(default_tree).as_posix())
    assert len(broken) == CORRUPT and set(broken) <= noisy


def test_bad_arguments_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        build_miniature_clothing1m(tmp_path / "a", images_per_class=30)
    with pytest.raises(ValueError, match="corrupt"):
        build_miniature_clothing1m(tmp_path / "b", images_per_class=60, corrupt=10_000)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_webvision_miniature_layout_and_reuse(tmp_path):
    root = build_miniature_webvision(tmp_path, classes=3, per_class=2, val_per_class=2)
    google = (root / "info" / "train_filelist_google.txt").read_text().splitlines()
    assert google[0] == "google/q0001/000000.jpg 0" and len(google) == 6
    assert len((root / "info" / "train_filelist_flickr.txt").read_text().splitlines()) == 6
    val = (root / "info" / "val_filelist.txt").read_text().splitlines()
    assert len(val) == 6 and all((root / "val_images_256" / line.split()[0]).is_file() for line in val)
    assert len((root / "info" / "synsets.txt").read_text().splitlines()) == 1000
    assert sorted(p.name for p in (root / "imagenet" / "val").iterdir()) == ["0", "1", "2"]
    assert len(list((root / "imagenet" / "val" / "2").glob("*.JPEG"))) == 2
    stamp = (root / ".miniature.json").stat().st_mtime_ns
    build_miniature_webvision(root, classes=3, per_class=2, val_per_class=2)
    assert (root / ".miniature.json").stat().st_mtime_ns == stamp


def test_other_arguments_rebuild_the_tree(tmp_path):
    root = build_miniature_webvision(tmp_path, classes=3, per_class=2)
    before = (root / "google" / "q0001" / "000000.jpg").read_bytes()
    build_miniature_webvision(root, classes=2, per_class=2, seed=1)
    assert (root / "google" / "q0001" / "000000.jpg").read_bytes() != before
    assert not (root / "google" / "q0003").exists()


def test_class_names_are_the_official_ones():
    assert len(CLOTHING1M_CLASSES) == 14 and CLOTHING1M_CLASSES[6:9] == ["Windbreaker", "Jacket", "Downcoat"]
