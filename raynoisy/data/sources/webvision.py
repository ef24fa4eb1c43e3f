"""WebVision 1.0 (1000 classes, Google + Flickr) and mini-WebVision (first 50 classes, Google only).

Both are scored on two evaluation sets, told apart by ``Catalog.group``: the WebVision validation
set and, when its folder exists, the ILSVRC12 validation images of the same classes (WebVision uses the
ILSVRC class order), which the user arranges as ``imagenet/val/<class index>/*.JPEG``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raynoisy.data.catalog import ORIGIN_TEST, ORIGIN_TRAIN, UNKNOWN_LABEL, Catalog
from raynoisy.data.images import FilePayloads, check_options
from raynoisy.data.sources import register_source
from raynoisy.errors import DataFormatError

FULL_CLASSES = 1000
MINI_CLASSES = 50
GROUP_TRAIN = "webvision-train"
GROUP_WEBVISION_VAL = "webvision-val"
GROUP_ILSVRC_VAL = "ilsvrc12-val"
_VAL_FOLDERS = ("val_images_256", "val_images")  # DivideMix's resized copy first, then the original
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


@register_source("webvision-mini", needs_root=True, transform="imagenet", image_size=224, channels=3)
def load_mini(root: Path | None, options: dict) -> Catalog:
    """mini-WebVision: Google images with label < 50; rows of other classes are skipped."""
    check_options("webvision-mini", options)
    assert root is not None
    return _load("webvision-mini", root, MINI_CLASSES, ("google",))


@register_source("webvision", needs_root=True, transform="imagenet", image_size=224, channels=3)
def load_full(root: Path | None, options: dict) -> Catalog:
    """WebVision 1.0: all Google then all Flickr training images."""
    check_options("webvision", options)
    assert root is not None
    return _load("webvision", root, FULL_CLASSES, ("google", "flickr"))


class _Rows:
    """Parallel per-row lists, appended to by each part of the data set in turn."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.labels: list[int] = []
        self.origins: list[str] = []
        self.groups: list[str] = []

    def add(self, path: str, label: int, origin: str, group: str) -> None:
        self.paths.append(path)
        self.labels.append(label)
        self.origins.append(origin)
        self.groups.append(group)


def _load(name: str, root: Path, num_classes: int, engines: tuple[str, ...]) -> Catalog:
    rows = _Rows()
    for engine in engines:
        for path, label in read_file_list(root / "info" / f"train_filelist_{engine}.txt", num_classes):
            rows.add(path, label, ORIGIN_TRAIN, GROUP_TRAIN)
    val_folder = _val_folder(root)
    for file, label in read_file_list(root / "info" / "val_filelist.txt", num_classes):
        rows.add(f"{val_folder}/{file}", label, ORIGIN_TEST, GROUP_WEBVISION_VAL)
    for path, label in _imagenet_val(root / "imagenet" / "val", num_classes):
        rows.add(path, label, ORIGIN_TEST, GROUP_ILSVRC_VAL)

    label = np.asarray(rows.labels, dtype=np.int64)
    origin = np.asarray(rows.origins, dtype=object)
    group = np.asarray(rows.groups, dtype=object)
    # Web labels of training images are unverified; validation labels are human-checked.
    true_label = np.where(origin == ORIGIN_TEST, label, UNKNOWN_LABEL)
    return Catalog(
        name=name,
        modality="image",
        class_names=_class_names(root / "info" / "synsets.txt", num_classes),
        label=label,
        true_label=true_label,
        origin=origin,
        read_payload=FilePayloads(root, rows.paths),
        group=group,
        description={
            "root": str(root),
            "engines": list(engines),
            "val_images": val_folder,
            "rows": {g: int(np.count_nonzero(group == g)) for g in dict.fromkeys(rows.groups)},
        },
    )


def read_file_list(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """``path label`` rows with label < ``num_classes``; labels outside 0..999 are errors, not skips."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataFormatError(str(path), "file not found; expected the WebVision 1.0 layout") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataFormatError(str(path), f"cannot read: {err}") from err
    rows: list[tuple[str, int]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataFormatError(str(path), f"expected 'path label', found {line.strip()!r}", line_number)
        try:
            label = int(fields[1])
        except ValueError:
            raise DataFormatError(str(path), f"label {fields[1]!r} is not an integer", line_number) from None
        if not 0 <= label < FULL_CLASSES:
            raise DataFormatError(str(path), f"label {label} is outside 0..{FULL_CLASSES - 1}", line_number)
        if label < num_classes:
            rows.append((fields[0], label))
    return rows


def _val_folder(root: Path) -> str:
    for folder in _VAL_FOLDERS:
        if (root / folder).is_dir():
            return folder
    raise DataFormatError(str(root / _VAL_FOLDERS[0]), f"not found (nor {_VAL_FOLDERS[1]}/)")


def _imagenet_val(folder: Path, num_classes: int) -> list[tuple[str, int]]:
    """Images of ``imagenet/val/<c>/``, by class index then file name; absent folder -> no rows."""
    if not folder.is_dir():
        return []
    rows: list[tuple[str, int]] = []
    classes: list[tuple[int, Path]] = []
    for entry in folder.iterdir():
        if not entry.is_dir():
            continue
        if not entry.name.isdigit():
            raise DataFormatError(str(entry), "ILSVRC12 val folders must be named by class index (0, 1, ...)")
        classes.append((int(entry.name), entry))
    for label, class_folder in sorted(classes):
        if label >= num_classes:
            continue
        files = sorted(p.name for p in class_folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        rows.extend((f"imagenet/val/{class_folder.name}/{file}", label) for file in files)
    return rows


def _class_names(path: Path, num_classes: int) -> list[str]:
    """Lines of ``info/synsets.txt`` (``n01440764 tench, ...``), else ``class_<i>``."""
    if not path.is_file():
        return [f"class_{i}" for i in range(num_classes)]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < num_classes:
        raise DataFormatError(str(path), f"{len(names)} synsets, expected at least {num_classes}")
    return names[:num_classes]
