"""Each source turns its files into the catalog the rest of the system relies on, and names bad files."""

from __future__ import annotations

import gzip
import io
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FASHION_TEST, FASHION_TRAIN, SST2_LINES
from PIL import Image

from raynoisy.config import Config
from raynoisy.data.catalog import UNKNOWN_LABEL, Catalog, MissingPayloadError
from raynoisy.data.miniature import build_miniature_clothing1m, build_miniature_webvision
from raynoisy.data.sources import get_source, load_catalog, resolve_root, source_names
from raynoisy.errors import ConfigError, DataFormatError

SST2_OPTIONS = {
    "format": "tsv",
    "header": False,
    "train": "senti.binary.train",
    "val": "senti.binary.dev",
    "test": "senti.binary.test",
}


def decode(payload: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(payload)))


def append_lines(path: Path, *lines: str) -> int:
    """Append lines to a text file; returns the 1-based number of the first appended line."""
    first = len(path.read_text().splitlines()) + 1
    with path.open("a") as stream:
        stream.writelines(f"{line}\n" for line in lines)
    return first


def counts(catalog: Catalog, column: np.ndarray) -> dict[str, int]:
    values, numbers = np.unique(column, return_counts=True)
    return dict(zip(values.tolist(), numbers.tolist(), strict=True))


def test_catalog_group_must_match_rows():
    with pytest.raises(ValueError, match="group"):
        Catalog("x", "text", ["a"], [0, 0], [0, 0], ["train", "train"], str, group=["a"])


# --- digits -----------------------------------------------------------------------------------------


def test_digits_rows_labels_and_pixels():
    from sklearn.datasets import load_digits

    catalog = load_catalog("digits", None)
    reference = load_digits()
    assert catalog.num_samples == 1797 and catalog.class_names == [str(i) for i in range(10)]
    assert set(catalog.origin) == {"train"}
    np.testing.assert_array_equal(catalog.label, reference.target)
    np.testing.assert_array_equal(catalog.true_label, catalog.label)
    pixels = decode(catalog.read_payload(5))
    assert pixels.shape == (8, 8) and pixels.max() == 255
    np.testing.assert_array_equal(pixels, np.rint(reference.images[5] * 255 / 16))


def test_unknown_option_names_the_option():
    with pytest.raises(ConfigError) as err:
        load_catalog("digits", None, {"colour": True})
    assert err.value.field == "data.options.colour"


# --- fashion-mnist ----------------------------------------------------------------------------------


def idx_pixels(root: Path, name: str, index: int) -> np.ndarray:
    raw = gzip.decompress((root / name).read_bytes())
    return np.frombuffer(raw, np.uint8, 784, 16 + 784 * index).reshape(28, 28)


def test_fashion_mnist_counts_and_pixels(fashion_mnist):
    fashion = load_catalog("fashion-mnist", fashion_mnist)
    n = FASHION_TRAIN
    assert fashion.num_samples == n + FASHION_TEST and fashion.class_names[9] == "Ankle boot"
    assert (fashion.origin[:n] == "train").all() and (fashion.origin[n:] == "test").all()
    np.testing.assert_array_equal(fashion.true_label, fashion.label)
    test_labels = np.frombuffer(
        gzip.decompress((fashion_mnist / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8
    )
    np.testing.assert_array_equal(fashion.label[n:], test_labels)
    np.testing.assert_array_equal(
        decode(fashion.read_payload(123)), idx_pixels(fashion_mnist, "train-images-idx3-ubyte.gz", 123)
    )
    np.testing.assert_array_equal(
        decode(fashion.read_payload(n + 7)), idx_pixels(fashion_mnist, "t10k-images-idx3-ubyte.gz", 7)
    )


def write_idx(path: Path, magic: int, shape: tuple[int, ...], data: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    path.write_bytes(gzip.compress(header + data) if path.suffix == ".gz" else header + data)


def tiny_fashion(root: Path, *, gz: bool = True) -> Path:
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 3), ("t10k", 2)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", 0x803, (n, 28, 28), b"\x07" * n * 784)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", 0x801, (n,), bytes(range(n)))
    return root


def test_fashion_mnist_reads_unpacked_files(tmp_path):
    catalog = load_catalog("fashion-mnist", tiny_fashion(tmp_path, gz=False))
    assert catalog.num_samples == 5 and catalog.label.tolist() == [0, 1, 2, 0, 1]
    assert (decode(catalog.read_payload(4)) == 7).all()


@pytest.mark.parametrize(
    ("file", "magic", "shape", "size", "problem"),
    [
        ("train-images-idx3-ubyte.gz", 0x801, (3, 28, 28), 3 * 784, "bad magic"),
        ("train-images-idx3-ubyte.gz", 0x803, (3, 28, 28), 2 * 784, "header says"),
        ("t10k-labels-idx1-ubyte.gz", 0x801, (3,), 3, "3 labels for 2 images"),
    ],
)
def test_fashion_mnist_bad_file_is_named(tmp_path, file, magic, shape, size, problem):
    tiny_fashion(tmp_path)
    write_idx(tmp_path / file, magic, shape, b"\x01" * size)
    with pytest.raises(DataFormatError, match=problem) as err:
        load_catalog("fashion-mnist", tmp_path)
    assert file in str(err.value)


def test_fashion_mnist_truncated_gzip_is_named(tmp_path):
    tiny_fashion(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataFormatError, match=re.escape("t10k-images-idx3-ubyte.gz")):
        load_catalog("fashion-mnist", tmp_path)


# --- cifar ------------------------------------------------------------------------------------------


def cifar_images(n: int, offset: int) -> np.ndarray:
    """Rows whose red, green and blue planes hold distinct values, to catch a channel-order mix-up."""
    planes = [np.full((n, 1024), offset + channel, np.uint8) for channel in (10, 20, 30)]
    planes[0][:, 0] = np.arange(n) + offset  # top-left red pixel identifies the image
    return np.concatenate(planes, axis=1)


def dump(path: Path, content: dict) -> None:
    path.write_bytes(pickle.dumps(content, protocol=2))


def write_cifar10(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", {b"data": cifar_images(2, 2 * i), b"labels": [i, 9]})
    dump(folder / "test_batch", {b"data": cifar_images(3, 100), b"labels": [0, 1, 2]})
    dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return folder


def test_cifar10_batches_in_order_with_rgb_payloads(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        catalog = load_catalog("cifar10", root)
        assert catalog.num_samples == 13 and catalog.class_names[3] == "c3"
        assert counts(catalog, catalog.origin) == {"train": 10, "test": 3}
        assert catalog.label[:4].tolist() == [1, 9, 2, 9] and catalog.label[10:].tolist() == [0, 1, 2]
        pixels = decode(catalog.read_payload(11))
        assert pixels.shape == (32, 32, 3)
        assert pixels[0, 0].tolist() == [101, 120, 130] and pixels[5, 5].tolist() == [110, 120, 130]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    dump(
        folder / "train",
        {b"data": cifar_images(4, 0), b"fine_labels": [99, 5, 5, 0], b"coarse_labels": [1, 2, 2, 3]},
    )
    dump(folder / "test", {b"data": cifar_images(1, 0), b"fine_labels": [42], b"coarse_labels": [0]})
    dump(folder / "meta", {b"fine_label_names": [f"f{i}" for i in range(100)], b"coarse_label_names": []})
    catalog = load_catalog("cifar100", tmp_path)
    assert catalog.num_classes == 100 and catalog.label.tolist() == [99, 5, 5, 0, 42]
    assert catalog.origin.tolist() == ["train"] * 4 + ["test"]


def test_cifar_missing_batch_is_named(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataFormatError, match="data_batch_4"):
        load_catalog("cifar10", tmp_path)


def test_cifar_label_out_of_range_is_named(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py")
    dump(folder / "test_batch", {b"data": cifar_images(1, 0), b"labels": [10]})
    with pytest.raises(DataFormatError, match="test_batch"):
        load_catalog("cifar10", tmp_path)


# --- clothing1m -------------------------------------------------------------------------------------

LISTS = {
    "noisy_train_key_list.txt": "train",
    "clean_train_key_list.txt": "trusted",
    "clean_val_key_list.txt": "val",
    "clean_test_key_list.txt": "test",
}


@pytest.fixture(scope="module")
def clothing_root(tmp_path_factory) -> Path:
    return build_miniature_clothing1m(
        tmp_path_factory.mktemp("clothing1m"), images_per_class=60, image_size=16
    )


@pytest.fixture
def clothing_lists(clothing_root, tmp_path) -> Path:
    """A copy of the miniature's text files only: safe to edit, and every image is missing."""
    for path in clothing_root.glob("*.txt"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def read_kv(path: Path) -> dict[str, int]:
    return {key: int(label) for key, label in (line.split() for line in path.read_text().splitlines())}


def test_clothing1m_rows_follow_the_lists(clothing_root):
    catalog = load_catalog("clothing1m", clothing_root)
    keys = np.asarray(catalog.read_payload.paths, dtype=object)
    for name, origin in LISTS.items():
        listed = (clothing_root / name).read_text().split()
        assert keys[catalog.origin == origin].tolist() == listed
    assert catalog.num_samples == len(set(keys)) == 14 * 60
    assert catalog.class_names[2] == "Knitwear"
    noisy, clean = (
        read_kv(clothing_root / "noisy_label_kv.txt"),
        read_kv(clothing_root / "clean_label_kv.txt"),
    )
    train = catalog.origin == "train"
    assert catalog.label[train].tolist() == [noisy[key] for key in keys[train]]
    assert catalog.label[~train].tolist() == [clean[key] for key in keys[~train]]
    np.testing.assert_array_equal(catalog.true_label[~train], catalog.label[~train])


def test_clothing1m_true_labels_of_noisy_keys_with_clean_labels(clothing_root):
    catalog = load_catalog("clothing1m", clothing_root)
    clean = read_kv(clothing_root / "clean_label_kv.txt")
    train = np.flatnonzero(catalog.origin == "train")
    overlap = [i for i in train if catalog.read_payload.paths[i] in clean]
    assert overlap and catalog.description["noisy_train_with_clean_label"] == len(overlap)
    assert catalog.true_label[overlap].tolist() == [clean[catalog.read_payload.paths[i]] for i in overlap]
    others = np.setdiff1d(train, overlap)
    assert (catalog.true_label[others] == UNKNOWN_LABEL).all()


def test_clothing1m_key_in_several_lists_keeps_the_highest(clothing_lists):
    root = clothing_lists
    test_key = (root / "clean_test_key_list.txt").read_text().split()[0]
    val_key = (root / "clean_val_key_list.txt").read_text().split()[0]
    trusted_key = (root / "clean_train_key_list.txt").read_text().split()[0]
    noisy_key = (root / "noisy_train_key_list.txt").read_text().split()[0]
    append_lines(root / "noisy_label_kv.txt", f"{test_key} 1", f"{val_key} 1", f"{trusted_key} 1")
    append_lines(root / "noisy_train_key_list.txt", test_key, val_key, trusted_key, noisy_key)
    append_lines(root / "clean_train_key_list.txt", test_key)
    append_lines(root / "clean_val_key_list.txt", test_key)
    catalog = load_catalog("clothing1m", root)
    assert catalog.num_samples == 14 * 60
    origin_of = dict(zip(catalog.read_payload.paths, catalog.origin, strict=True))
    assert [origin_of[k] for k in (test_key, val_key, trusted_key, noisy_key)] == [
        "test",
        "val",
        "trusted",
        "train",
    ]
    assert catalog.description["dropped_keys"] == {
        "clean_test_key_list.txt": 0,
        "clean_val_key_list.txt": 1,
        "clean_train_key_list.txt": 1,
        "noisy_train_key_list.txt": 4,
    }
    clean = read_kv(root / "clean_label_kv.txt")
    assert catalog.label[catalog.read_payload.paths.index(trusted_key)] == clean[trusted_key]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("images/0/00/9999.jpg seven", "not an integer"),
        ("images/0/00/9999.jpg 14", "outside 0..13"),
        ("a b c", "expected"),
    ],
)
def test_clothing1m_malformed_kv_line_names_file_and_line(clothing_lists, line, problem):
    number = append_lines(clothing_lists / "clean_label_kv.txt", line)
    with pytest.raises(DataFormatError, match=problem) as err:
        load_catalog("clothing1m", clothing_lists)
    assert f"clean_label_kv.txt:{number}:" in str(err.value)


def test_clothing1m_list_key_without_label_names_file_and_line(clothing_lists):
    number = append_lines(clothing_lists / "clean_val_key_list.txt", "images/9/99/999999.jpg")
    with pytest.raises(DataFormatError, match=re.escape("no label in clean_label_kv.txt")) as err:
        load_catalog("clothing1m", clothing_lists)
    assert f"clean_val_key_list.txt:{number}:" in str(err.value)


def test_clothing1m_payload_is_the_jpeg_or_a_missing_payload_error(clothing_root, clothing_lists):
    assert load_catalog("clothing1m", clothing_root).read_payload(0)[:2] == b"\xff\xd8"
    with pytest.raises(MissingPayloadError, match="images/"):
        load_catalog("clothing1m", clothing_lists).read_payload(0)


def test_clothing1m_missing_list_file_is_named(clothing_lists):
    (clothing_lists / "clean_val_key_list.txt").unlink()
    with pytest.raises(DataFormatError, match=re.escape("clean_val_key_list.txt")):
        load_catalog("clothing1m", clothing_lists)


# --- webvision --------------------------------------------------------------------------------------


@pytest.fixture
def webvision_root(tmp_path) -> Path:
    root = build_miniature_webvision(tmp_path / "webvision", classes=4, per_class=3, val_per_class=2)
    append_lines(root / "info" / "train_filelist_google.txt", "google/q0061/000000.jpg 60")
    return root


def test_webvision_mini_keeps_google_images_of_the_first_50_classes(webvision_root):
    catalog = load_catalog("webvision-mini", webvision_root)
    assert catalog.num_classes == 50 and catalog.class_names[1] == "n00000001 synthetic class 1"
    assert counts(catalog, catalog.group) == {"webvision-train": 12, "webvision-val": 8, "ilsvrc12-val": 8}
    train = catalog.group == "webvision-train"
    assert (catalog.origin[train] == "train").all() and (catalog.origin[~train] == "test").all()
    assert all(path.startswith("google/") for path in np.asarray(catalog.read_payload.paths)[train])
    assert (catalog.true_label[train] == UNKNOWN_LABEL).all()
    np.testing.assert_array_equal(catalog.true_label[~train], catalog.label[~train])
    ilsvrc = np.flatnonzero(catalog.group == "ilsvrc12-val")
    assert catalog.label[ilsvrc].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert decode(catalog.read_payload(int(ilsvrc[-1]))).shape == (32, 32, 3)
    assert decode(catalog.read_payload(int(np.flatnonzero(catalog.group == "webvision-val")[0]))).ndim == 3


def test_webvision_full_adds_flickr_and_all_classes(webvision_root):
    catalog = load_catalog("webvision", webvision_root)
    assert catalog.num_classes == 1000
    assert counts(catalog, catalog.group)["webvision-train"] == 12 + 1 + 12
    assert 60 in catalog.label.tolist()


def test_webvision_val_images_fallback_and_optional_imagenet(tmp_path):
    root = build_miniature_webvision(tmp_path, classes=2, per_class=1, val_per_class=1, with_imagenet=False)
    (root / "val_images_256").rename(root / "val_images")
    catalog = load_catalog("webvision-mini", root)
    assert "ilsvrc12-val" not in set(catalog.group)
    val = int(np.flatnonzero(catalog.group == "webvision-val")[0])
    assert catalog.read_payload.paths[val].startswith("val_images/")
    assert catalog.read_payload(val)[:2] == b"\xff\xd8"


@pytest.mark.parametrize(
    ("file", "line"),
    [
        ("train_filelist_google.txt", "google/q0001/000009.jpg"),
        ("train_filelist_flickr.txt", "flickr/x.jpg one"),
        ("val_filelist.txt", "val.jpg 1000"),
    ],
)
def test_webvision_malformed_line_names_file_and_line(webvision_root, file, line):
    number = append_lines(webvision_root / "info" / file, line)
    with pytest.raises(DataFormatError) as err:
        load_catalog("webvision", webvision_root)
    assert f"{file}:{number}:" in str(err.value)


def test_webvision_imagenet_folders_must_be_class_indices(webvision_root):
    (webvision_root / "imagenet" / "val" / "n01440764").mkdir()
    with pytest.raises(DataFormatError, match="n01440764"):
        load_catalog("webvision-mini", webvision_root)


# --- image-list -------------------------------------------------------------------------------------

IMAGE_LIST = """path,label,trusted,checked,split
img/a.jpg,cat,0,,train
img/b.jpg,dog,1,,train
img/c.jpg,cat,0,dog,train
img/d.jpg,bird,0,,val
img/e.jpg,dog,0,,test
"""


def write_image_list(folder: Path, text: str = IMAGE_LIST, name: str = "labels.csv") -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for letter in "abcde":
        (folder / "img" / f"{letter}.jpg").write_bytes(letter.encode())
    (folder / name).write_text(text)
    return folder


LIST_OPTIONS = {"trusted_column": "trusted", "trusted_label_column": "checked", "split_column": "split"}


def test_image_list_labels_trust_and_splits(tmp_path):
    catalog = load_catalog("image-list", write_image_list(tmp_path), LIST_OPTIONS)
    assert catalog.class_names == ["bird", "cat", "dog"]
    assert catalog.label.tolist() == [1, 2, 1, 0, 2]
    assert catalog.origin.tolist() == ["train", "trusted", "train", "val", "test"]
    assert catalog.trusted_label.tolist() == [-1, -1, 2, -1, -1]
    assert catalog.true_label.tolist() == [-1, 2, 2, 0, 2]
    assert catalog.read_payload(2) == b"c"


def test_image_list_evaluation_only_true_labels_change_no_origin_or_truth(tmp_path):
    """The same list with its ``checked`` column read as evaluation-only true labels instead of a trusted
    annotator's: row c stays a training row with an unknown training truth, and carries eval_label dog."""
    options = {"trusted_column": "trusted", "true_label_column": "checked", "split_column": "split"}
    catalog = load_catalog("image-list", write_image_list(tmp_path), options)
    assert catalog.origin.tolist() == ["train", "trusted", "train", "val", "test"]
    assert catalog.trusted_label is None
    assert catalog.true_label.tolist() == [-1, 2, -1, 0, 2]
    assert catalog.eval_label.tolist() == [-1, -1, 2, -1, -1]


def test_image_list_tsv_in_folder_with_integer_labels(tmp_path):
    rows = "".join(
        f"img/{letter}.jpg\t{label}\n" for letter, label in zip("abcde", [3, 0, 3, 1, 0], strict=True)
    )
    write_image_list(tmp_path, "path\tlabel\n" + rows, "labels.tsv")
    catalog = load_catalog("image-list", tmp_path)
    assert catalog.class_names == ["0", "1", "2", "3"] and catalog.label.tolist() == [3, 0, 3, 1, 0]
    assert set(catalog.origin) == {"train"} and catalog.trusted_label is None
    assert (catalog.true_label == UNKNOWN_LABEL).all()


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        ("img/f.jpg,cat,maybe,,train", "not a 0/1 flag"),
        ("img/f.jpg,cat,0,,dev", "split 'dev'"),
        ("img/f.jpg,,0,,train", "empty"),
    ],
)
def test_image_list_bad_row_names_file_and_line(tmp_path, bad_row, problem):
    write_image_list(tmp_path, IMAGE_LIST + bad_row + "\n")
    with pytest.raises(DataFormatError, match=problem) as err:
        load_catalog("image-list", tmp_path / "labels.csv", LIST_OPTIONS)
    assert "labels.csv:7:" in str(err.value)


def test_image_list_options_are_checked(tmp_path):
    write_image_list(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_catalog("image-list", tmp_path, {"image_size": 64})
    assert err.value.field == "data.options.image_size"
    with pytest.raises(ConfigError, match="no column 'file'") as err:
        load_catalog("image-list", tmp_path, {"path_column": "file"})
    assert err.value.field == "data.options.path_column"


# --- text-table -------------------------------------------------------------------------------------


def test_text_table_csv_with_quotes_and_trusted_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label,gold\n"good, really",pos,pos\nbad,neg,\n"said ""meh""",pos,neg\n')
    catalog = load_catalog("text-table", path, {"trusted_label_column": "gold"})
    assert catalog.modality == "text" and catalog.class_names == ["neg", "pos"]
    assert [catalog.read_payload(i) for i in range(3)] == ["good, really", "bad", 'said "meh"']
    assert catalog.label.tolist() == [1, 0, 1] and catalog.trusted_label.tolist() == [1, -1, 0]
    assert catalog.true_label.tolist() == [1, -1, 0] and set(catalog.origin) == {"train"}


def test_text_table_sst2_folder(sst2):
    catalog = load_catalog("text-table", sst2, SST2_OPTIONS)
    n = len(SST2_LINES["senti.binary.train"])
    assert counts(catalog, catalog.origin) == {
        "train": n,
        "val": len(SST2_LINES["senti.binary.dev"]),
        "test": len(SST2_LINES["senti.binary.test"]),
    }
    assert catalog.class_names == ["0", "1"]
    assert catalog.read_payload(0) == "hide new secretions from the parental units" and catalog.label[0] == 0
    assert (
        catalog.read_payload(n) == "It 's a charming and often affecting journey ." and catalog.label[n] == 1
    )
    assert (catalog.true_label[:n] == UNKNOWN_LABEL).all()
    np.testing.assert_array_equal(catalog.true_label[n:], catalog.label[n:])


def test_text_table_parquet_with_class_names_and_flag(tmp_path):
    path = tmp_path / "data.parquet"
    table = {"body": ["a", "b", "c"], "y": [2, 0, 1], "ok": [True, False, True]}
    pq.write_table(pa.table(table), path)
    options = {
        "text_column": "body",
        "label_column": "y",
        "trusted_column": "ok",
        "class_names": ["x", "y", "z"],
    }
    catalog = load_catalog("text-table", path, options)
    assert catalog.class_names == ["x", "y", "z"] and catalog.label.tolist() == [2, 0, 1]
    assert catalog.origin.tolist() == ["trusted", "train", "trusted"]
    assert catalog.true_label.tolist() == [2, -1, 1]


def test_text_table_errors(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\nfine\t0\ntoo\tmany\tfields\n")
    with pytest.raises(DataFormatError, match="3 fields, expected 2") as err:
        load_catalog("text-table", path)
    assert "data.tsv:3:" in str(err.value)
    path.write_text("text\tlabel\nfine\t0\nunknown\t5\n")
    with pytest.raises(DataFormatError, match="label '5'") as err:
        load_catalog("text-table", path, {"class_names": ["neg", "pos"]})
    assert "data.tsv:3:" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_catalog("text-table", tmp_path)
    assert err.value.field == "data.options.train"
    with pytest.raises(ConfigError) as err:
        load_catalog("text-table", path, {"text_column": "review"})
    assert err.value.field == "data.options.text_column"
    with pytest.raises(ConfigError) as err:
        load_catalog("text-table", tmp_path / "data.tsv", {"format": "xlsx"})
    assert err.value.field == "data.options.format"


# --- the registry and the data root a run reads ---------------------------------------------------------


def test_every_source_is_registered_and_an_unknown_name_lists_them():
    names = source_names()
    expected = {"digits", "fashion-mnist", "cifar10", "cifar100", "clothing1m", "webvision-mini", "webvision"}
    assert expected | {"image-list", "text-table"} <= set(names) and names == sorted(names)
    assert get_source("cifar10").channels == 3 and not get_source("digits").needs_root
    with pytest.raises(ConfigError) as err:
        get_source("mnist-9000")
    assert err.value.field == "data.dataset" and "'mnist-9000'" in err.value.problem
    assert "digits" in err.value.fix and "clothing1m" in err.value.fix


def test_resolve_root_is_the_absolute_data_root_or_the_embedded_copy(tmp_path, monkeypatch):
    cfg = Config()
    cfg.data.dataset = "digits"
    assert resolve_root(cfg) is None  # bundled with scikit-learn: no root
    (tmp_path / "fmnist").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg.data.dataset, cfg.data.root = "fashion-mnist", "fmnist"
    assert resolve_root(cfg) == str(tmp_path / "fmnist")
    built: list[str] = []

    def embedded(dataset: str, log=print) -> Path:
        built.append(dataset)
        return tmp_path / "embedded"

    monkeypatch.setattr("raynoisy.data.embedded.embedded_root", embedded)
    cfg.data.dataset, cfg.data.root = "clothing1m", None
    assert resolve_root(cfg) == str(tmp_path / "embedded") and built == ["clothing1m"]
    cfg.data.root = "fmnist"  # a root given wins over the embedded copy
    assert resolve_root(cfg) == str(tmp_path / "fmnist") and built == ["clothing1m"]
