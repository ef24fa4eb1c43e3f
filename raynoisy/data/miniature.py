"""Synthetic miniatures of Clothing1M and WebVision in their exact official layouts.

The real sets are 1M+ images behind a licence form, yet the code that reads them (list priority,
label files, corrupt JPEGs, two evaluation sets) must be tested and demonstrated everywhere. A
miniature goes through the very same loader as the real data, and is learnable but not trivial:
each class is one combination of a texture and a colour family, and every texture and every colour is
shared by two classes, so a network must see both; position, scale, shade and background vary.
Noisy labels follow the real set's class-dependent confusions (Knitwear<->Sweater, Windbreaker<->Jacket, ...).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLOTHING1M_CLASSES = [
    "T-Shirt",
    "Shirt",
    "Knitwear",
    "Chiffon",
    "Sweater",
    "Hoodie",
    "Windbreaker",
    "Jacket",
    "Downcoat",
    "Suit",
    "Shawl",
    "Dress",
    "Vest",
    "Underwear",
]

# True class -> (the class its web label most often says instead, how often); the pairs are the
# real set's dominant confusions. On top, _SPREAD of every class goes uniformly to the other classes.
_CONFUSION = {
    0: (1, 0.20),  # T-Shirt -> Shirt
    1: (0, 0.25),  # Shirt -> T-Shirt
    2: (4, 0.45),  # Knitwear -> Sweater
    3: (11, 0.35),  # Chiffon -> Dress
    4: (2, 0.30),  # Sweater -> Knitwear
    5: (4, 0.30),  # Hoodie -> Sweater
    6: (7, 0.40),  # Windbreaker -> Jacket
    7: (6, 0.30),  # Jacket -> Windbreaker
    8: (7, 0.30),  # Downcoat -> Jacket
    9: (7, 0.15),  # Suit -> Jacket
    10: (3, 0.25),  # Shawl -> Chiffon
    11: (3, 0.20),  # Dress -> Chiffon
    12: (13, 0.25),  # Vest -> Underwear
    13: (12, 0.15),  # Underwear -> Vest
}
_SPREAD = 0.10  # expected wrong labels on noisy_train: 0.10 + mean rate above = 37.5% (real: ~38%)

# Share of each class per list (the real set is ~93% noisy; a miniature needs usable clean sets),
# with the minimum count per class that keeps every clean set meaningful.
_CLEAN_SHARES = {"clean_test": (0.10, 15), "clean_val": (0.07, 8), "clean_train": (0.13, 15)}
_MIN_NOISY = 20
_OVERLAP = 0.10  # share of noisy_train images that also have a clean label (real: ~37k of 1M)

_COLOURS = np.array(
    [
        [0.80, 0.15, 0.15],  # red
        [0.15, 0.62, 0.25],  # green
        [0.15, 0.28, 0.80],  # blue
        [0.88, 0.80, 0.15],  # yellow
        [0.55, 0.20, 0.68],  # purple
        [0.15, 0.70, 0.75],  # cyan
        [0.92, 0.48, 0.12],  # orange
    ]
)
_TEXTURES = 7  # horizontal, vertical, checker, dots, diagonal, rings, plain
# Not part of the official layout: the class every image was drawn from, so the real noise rate of the
# noisy_train labels (and the accuracy of corrected labels) can be measured on all of them.
TRUTH_FILE = "miniature_true_label_kv.txt"
_STAMP = ".miniature.json"
_GENERATOR_VERSION = 1  # bump when the generator's output changes, so stale trees are rebuilt
_JPEG_QUALITY = 90


def build_miniature_clothing1m(
    root: Path, *, images_per_class: int = 150, image_size: int = 64, seed: int = 0, corrupt: int = 0
) -> Path:
    """Write a Clothing1M-layout tree under ``root`` (2,100 JPEGs by default) and return ``root``.

    ``corrupt`` noisy-train JPEGs are overwritten with garbage bytes, to exercise skip-and-count.
    Idempotent: a complete tree built with the same arguments is left as it is.
    """
    root = Path(root)
    args = {"kind": "clothing1m", "images_per_class": images_per_class, "image_size": image_size}
    args |= {"seed": seed, "corrupt": corrupt}
    counts = _list_counts(images_per_class)
    classes = len(CLOTHING1M_CLASSES)
    if not 0 <= corrupt <= counts["noisy_train"] * classes:
        raise ValueError(
            f"corrupt={corrupt} is not in 0..{counts['noisy_train'] * classes} (the noisy_train size)"
        )
    if _already_built(root, args):
        return root
    rng = np.random.default_rng(seed)
    # Interleave classes and lists over the key numbers, as the real keys are not grouped by class.
    numbers = rng.permutation(classes * images_per_class)
    members: dict[str, list[tuple[int, int]]] = {name: [] for name in counts}
    for label in range(classes):
        start = 0
        for name, count in counts.items():
            block = numbers[label * images_per_class + start : label * images_per_class + start + count]
            members[name].extend((int(n), label) for n in block)
            start += count
    members = {name: sorted(rows) for name, rows in members.items()}

    noisy = members["noisy_train"]
    noisy_labels = _noisy_labels(rng, np.array([label for _, label in noisy]))
    overlap = rng.random(len(noisy)) < _OVERLAP
    corrupted = set(rng.choice(len(noisy), size=corrupt, replace=False).tolist())

    def key(number: int) -> str:
        # The real two folder levels, but 100 folders, not 1000: creating a folder per two images is slow.
        return f"images/{number % 10}/{number // 10 % 10:02d}/{number}.jpg"

    writer = _JpegWriter(root)
    for name, rows in members.items():
        for i, (number, label) in enumerate(rows):
            if name == "noisy_train" and i in corrupted:
                writer.write_bytes(key(number), rng.bytes(256))
            else:
                writer.write(key(number), render_image(rng, label, image_size))

    clean_rows = [row for name, rows in members.items() if name != "noisy_train" for row in rows]
    clean_rows += [row for row, both in zip(noisy, overlap, strict=True) if both]
    _write_lines(root / "category_names_eng.txt", CLOTHING1M_CLASSES)
    _write_lines(root / "category_names_chn.txt", CLOTHING1M_CLASSES)  # the real file is in Chinese
    _write_lines(
        root / "noisy_label_kv.txt", [f"{key(n)} {y}" for (n, _), y in zip(noisy, noisy_labels, strict=True)]
    )
    _write_lines(root / "clean_label_kv.txt", [f"{key(n)} {y}" for n, y in sorted(clean_rows)])
    for name, rows in members.items():
        _write_lines(root / f"{name}_key_list.txt", [key(n) for n, _ in rows])
    everything = sorted(row for rows in members.values() for row in rows)
    _write_lines(root / TRUTH_FILE, [f"{key(n)} {y}" for n, y in everything])
    _mark_complete(root, args)
    return root


def build_miniature_webvision(
    root: Path,
    *,
    classes: int = 4,
    per_class: int = 10,
    val_per_class: int = 3,
    with_imagenet: bool = True,
    seed: int = 0,
) -> Path:
    """Write a tiny WebVision 1.0 tree (Google + Flickr lists, val, ILSVRC12 val folders) and return ``root``.

    ``with_imagenet`` adds ``imagenet/val/<c>/`` for the first ``min(classes, 50)`` classes, ``val_per_class``
    images each. Idempotent like ``build_miniature_clothing1m``.
    """
    root = Path(root)
    args = {"kind": "webvision", "classes": classes, "per_class": per_class, "val_per_class": val_per_class}
    args |= {"with_imagenet": with_imagenet, "seed": seed}
    if _already_built(root, args):
        return root
    rng = np.random.default_rng(seed)
    size = 32
    writer = _JpegWriter(root)
    for engine in ("google", "flickr"):
        lines = []
        for label in range(classes):
            for i in range(per_class):
                path = f"{engine}/q{label + 1:04d}/{i:06d}.jpg"
                writer.write(path, render_image(rng, label, size))
                lines.append(f"{path} {label}")
        _write_lines(root / "info" / f"train_filelist_{engine}.txt", lines)
    lines = []
    for number, label in enumerate(np.repeat(np.arange(classes), val_per_class), start=1):
        writer.write(f"val_images_256/val{number:06d}.jpg", render_image(rng, int(label), size))
        lines.append(f"val{number:06d}.jpg {label}")
    _write_lines(root / "info" / "val_filelist.txt", lines)
    _write_lines(root / "info" / "synsets.txt", [f"n{c:08d} synthetic class {c}" for c in range(1000)])
    if with_imagenet:
        number = 0
        for label in range(min(classes, 50)):
            for _ in range(val_per_class):
                number += 1
                path = f"imagenet/val/{label}/ILSVRC2012_val_{number:08d}.JPEG"
                writer.write(path, render_image(rng, label, size))
    _mark_complete(root, args)
    return root


def render_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """One ``size`` x ``size`` RGB uint8 image of class ``label``: a textured, coloured ellipse on noise."""
    texture = label % _TEXTURES
    colour = _COLOURS[(label + 3 * (label // _TEXTURES)) % len(_COLOURS)]
    y, x = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    rx, ry = rng.uniform(0.2, 0.4, size=2)
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    freq, phase = rng.uniform(3.0, 7.0), rng.uniform(0.0, 2 * np.pi)
    on = _texture(texture, x - cx, y - cy, freq, phase)
    shade = colour * rng.uniform(0.75, 1.15) + rng.normal(0.0, 0.06, size=3)
    foreground = np.where(on[..., None], shade, shade * 0.45)
    background = rng.uniform(0.3, 0.8) + rng.normal(0.0, 0.05, size=3)
    image = np.where(inside[..., None], foreground, background)
    image += rng.normal(0.0, 0.06, size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _texture(kind: int, x: np.ndarray, y: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """Boolean "on" mask of texture ``kind`` over coordinates centred on the shape."""
    wave = 2 * np.pi * freq
    if kind == 0:
        return np.sin(wave * y + phase) > 0
    if kind == 1:
        return np.sin(wave * x + phase) > 0
    if kind == 2:
        return (np.sin(wave * x + phase) > 0) ^ (np.sin(wave * y + phase) > 0)
    if kind == 3:
        return ((x * freq + phase) % 1 - 0.5) ** 2 + ((y * freq + phase) % 1 - 0.5) ** 2 < 0.09
    if kind == 4:
        return np.sin(wave * (x + y) / np.sqrt(2) + phase) > 0
    if kind == 5:
        return np.sin(wave * np.hypot(x, y) + phase) > 0
    return np.ones_like(x, dtype=bool)


def _noisy_labels(rng: np.random.Generator, true: np.ndarray) -> np.ndarray:
    """Draw web labels from the class-dependent transition matrix built from ``_CONFUSION``."""
    classes = len(CLOTHING1M_CLASSES)
    transition = np.full((classes, classes), _SPREAD / (classes - 1))
    for label, (mistaken_for, rate) in _CONFUSION.items():
        transition[label, mistaken_for] += rate
        transition[label, label] = 1.0 - _SPREAD - rate
    cumulative = transition.cumsum(axis=1)[true]
    draws = rng.random(len(true))[:, None]
    return np.minimum((draws > cumulative).sum(axis=1), classes - 1)


def _list_counts(images_per_class: int) -> dict[str, int]:
    """Images per class in each list; noisy_train gets the rest."""
    counts = {
        name: max(minimum, round(share * images_per_class))
        for name, (share, minimum) in _CLEAN_SHARES.items()
    }
    noisy = images_per_class - sum(counts.values())
    if noisy < _MIN_NOISY:
        need = sum(counts.values()) + _MIN_NOISY
        raise ValueError(
            f"images_per_class={images_per_class} is too small for the clean sets; use >= {need}"
        )
    return {"noisy_train": noisy, **counts}


class _JpegWriter:
    """Writes files under a root, creating each folder once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders: set[Path] = set()

    def _path(self, relative: str) -> Path:
        path = self.root / relative
        if path.parent not in self.folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.folders.add(path.parent)
        return path

    def write(self, relative: str, pixels: np.ndarray) -> None:
        Image.fromarray(pixels).save(self._path(relative), format="JPEG", quality=_JPEG_QUALITY)

    def write_bytes(self, relative: str, data: bytes) -> None:
        self._path(relative).write_bytes(data)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _already_built(root: Path, args: dict) -> bool:
    """True if ``root`` holds a complete tree built with ``args``; else make it an empty tree of ours.

    The stamp is written before anything else and marked complete last, so an interrupted build is
    recognised as ours and rebuilt, while a folder without a stamp (real data, say) is never deleted.
    """
    stamp = root / _STAMP
    args = {**args, "version": _GENERATOR_VERSION}
    if stamp.is_file():
        if json.loads(stamp.read_text()) == {**args, "complete": True}:
            return True
        for child in root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    elif root.is_dir() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no miniature stamp; refusing to write into it")
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({**args, "complete": False}))
    return False


def _mark_complete(root: Path, args: dict) -> None:
    (root / _STAMP).write_text(json.dumps({**args, "version": _GENERATOR_VERSION, "complete": True}))
