"""Sources on generated miniature trees and the bundled data: counts, origins, labels, and clear errors."""

import io
import shutil

import numpy as np
import pytest
from conftest import FASHION_TEST, FASHION_TRAIN
from PIL import Image

from raynoisy.data.catalog import MissingPayloadError
from raynoisy.data.miniature import build_miniature_clothing1m, build_miniature_webvision
from raynoisy.data.sources import load_catalog
from raynoisy.errors import DataFormatError


@pytest.fixture(scope="module")
def clothing(tmp_path_factory):
    return build_miniature_clothing1m(tmp_path_factory.mktemp("c1m"), images_per_class=60, image_size=32)


def _copy(tree, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tree, dst)
    return dst


def test_clothing1m_official_layout(clothing):
    cat = load_catalog("clothing1m", clothing)
    assert cat.num_classes == 14 and cat.class_names[2] == "Knitwear"
    origins = {o: int((cat.origin == o).sum()) for o in ("train", "trusted", "val", "test")}
    lists = {
        "train": "noisy_train_key_list.txt",
        "trusted": "clean_train_key_list.txt",
        "val": "clean_val_key_list.txt",
        "test": "clean_test_key_list.txt",
    }
    keys = {o: set((clothing / f).read_text().split()) for o, f in lists.items()}
    # Priority test > val > trusted > train, so the rows per origin are the list minus higher lists.
    assert origins["test"] == len(keys["test"])
    assert origins["trusted"] == len(keys["trusted"] - keys["val"] - keys["test"])
    assert origins["train"] == len(keys["train"] - keys["trusted"] - keys["val"] - keys["test"])
    clean = dict(line.split() for line in (clothing / "clean_label_kv.txt").read_text().splitlines())
    noisy = dict(line.split() for line in (clothing / "noisy_label_kv.txt").read_text().splitlines())
    train_keys = sorted(keys["train"] - keys["trusted"] - keys["val"] - keys["test"])
    overlap = [k for k in train_keys if k in clean]
    assert overlap, "the miniature must have noisy-train images with clean labels, like the real set"
    # Train rows carry the noisy label and, where a human label exists, the true label.
    payload_to_key = {(clothing / k).read_bytes(): k for k in train_keys[:50]}
    for i in np.flatnonzero(cat.origin == "train")[:200]:
        key = payload_to_key.get(cat.read_payload(int(i)))
        if key is not None:
            assert cat.label[i] == int(noisy[key])
            assert cat.true_label[i] == (int(clean[key]) if key in clean else -1)
    assert Image.open(io.BytesIO(cat.read_payload(0))).format == "JPEG"


@pytest.mark.parametrize(
    ("file", "bad_line", "message"),
    [
        ("noisy_label_kv.txt", "images/0/00/broken.jpg", "expected 'key label'"),
        ("clean_label_kv.txt", "images/0/00/x.jpg seven", "is not an integer"),
        ("noisy_label_kv.txt", "images/0/00/y.jpg 14", "outside 0..13"),
    ],
)
def test_clothing1m_malformed_line_names_file_and_line(clothing, tmp_path, file, bad_line, message):
    root = _copy(clothing, tmp_path)
    path = root / file
    lines = path.read_text().splitlines()
    lines.insert(4, bad_line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as info:
        load_catalog("clothing1m", root)
    assert f"{file}:5" in str(info.value) and message in str(info.value)


def test_clothing1m_key_without_label(clothing, tmp_path):
    root = _copy(clothing, tmp_path)
    with (root / "clean_test_key_list.txt").open("a") as f:
        f.write("images/9/99/unlabelled.jpg\n")
    n = len((root / "clean_test_key_list.txt").read_text().splitlines())
    with pytest.raises(
        DataFormatError, match=rf"clean_test_key_list\.txt:{n}: .*unlabelled\.jpg has no label"
    ):
        load_catalog("clothing1m", root)


def test_clothing1m_missing_image(clothing, tmp_path):
    root = _copy(clothing, tmp_path)
    cat = load_catalog("clothing1m", root)
    first_test = int(np.flatnonzero(cat.origin == "test")[0])
    key = (root / "clean_test_key_list.txt").read_text().split()[0]
    (root / key).unlink()
    with pytest.raises(MissingPayloadError, match=key.split("/")[-1]):
        cat.read_payload(first_test)


def test_clothing1m_missing_list_file(clothing, tmp_path):
    root = _copy(clothing, tmp_path)
    (root / "clean_val_key_list.txt").unlink()
    with pytest.raises(DataFormatError, match=r"clean_val_key_list\.txt"):
        load_catalog("clothing1m", root)


@pytest.fixture(scope="module")
def webvision(tmp_path_factory):
    return build_miniature_webvision(tmp_path_factory.mktemp("wv"), classes=4, per_class=6, val_per_class=3)


def test_webvision_lists_and_groups(webvision):
    mini = load_catalog("webvision-mini", webvision)
    full = load_catalog("webvision", webvision)
    assert mini.num_classes == 50 and full.num_classes == 1000
    google = (webvision / "info" / "train_filelist_google.txt").read_text().splitlines()
    assert int((mini.origin == "train").sum()) == sum(int(line.split()[1]) < 50 for line in google)
    assert int((full.origin == "train").sum()) > int((mini.origin == "train").sum())  # + flickr
    test = mini.origin == "test"
    assert set(mini.group[test].tolist()) == {"webvision-val", "ilsvrc12-val"}
    assert (mini.true_label[test] >= 0).all() and (mini.true_label[mini.origin == "train"] == -1).all()


def test_webvision_malformed_line(webvision, tmp_path):
    root = _copy(webvision, tmp_path)
    path = root / "info" / "val_filelist.txt"
    lines = path.read_text().splitlines()
    lines.insert(1, "val000999.jpg not-a-label")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"val_filelist\.txt:2: .*not an integer"):
        load_catalog("webvision-mini", root)


def test_webvision_missing_image(webvision, tmp_path):
    root = _copy(webvision, tmp_path)
    cat = load_catalog("webvision-mini", root)
    victim = (root / "info" / "train_filelist_google.txt").read_text().split()[0]
    (root / victim).unlink()
    with pytest.raises(MissingPayloadError):
        cat.read_payload(0)


def test_digits_and_fashion_mnist(fashion_mnist):
    digits = load_catalog("digits", None)
    assert digits.num_samples == 1797 and digits.num_classes == 10
    fm = load_catalog("fashion-mnist", fashion_mnist)
    assert (
        int((fm.origin == "train").sum()) == FASHION_TRAIN
        and int((fm.origin == "test").sum()) == FASHION_TEST
    )
    img = np.asarray(Image.open(io.BytesIO(fm.read_payload(0))))
    assert img.shape == (28, 28) and fm.label[0] == fm.true_label[0]


def test_text_table_sst2(sst2):
    options = {
        "format": "tsv",
        "header": False,
        "text_column": 0,
        "label_column": 1,
        "train": "senti.binary.train",
        "val": "senti.binary.dev",
        "test": "senti.binary.test",
    }
    cat = load_catalog("text-table", sst2, options)
    counts = {o: int((cat.origin == o).sum()) for o in ("train", "val", "test")}
    assert counts == {"train": 3, "val": 2, "test": 1}  # the lines of conftest.SST2_LINES
    assert cat.modality == "text" and isinstance(cat.read_payload(0), str)
