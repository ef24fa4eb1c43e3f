"""Decode and augment image payloads, batch-wise, inside Ray Data tasks (text: ``raynoisy.data.text``).

Decoding and geometric augmentation run on CPU in ``map_batches`` and yield uint8 arrays (4x smaller than
float to move); normalisation to float runs on the worker's device. A payload that fails to decode is
not an error here: it comes out as ``ok = False`` and the worker skips and counts it.

Families (from the references): ``small`` (8x8 / 28x28: identity), ``cifar`` (reflect-pad 4, random
crop 32, horizontal flip), ``imagenet`` (Clothing1M/WebVision: resize the short side to size*8/7, random
crop + flip for training, centre crop for evaluation; ImageNet normalisation).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# Transform families whose training transform is the evaluation one (text is tokenised, never augmented): a
# training sample is the same input every epoch, so whatever a frozen network computes from it can be kept.
UNAUGMENTED_FAMILIES = frozenset({"small", "text"})

_MEAN_STD = {
    "small": ((0.5,), (0.5,)),
    "cifar": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class ImageTransform:
    """How one data set's images become network inputs."""

    family: str
    size: int
    channels: int
    train: bool

    def decode_one(self, payload: bytes, rng: np.random.Generator) -> np.ndarray:
        """Encoded bytes -> uint8 [size, size, channels]; raises on undecodable bytes."""
        with Image.open(io.BytesIO(payload)) as img:
            mode = "L" if self.channels == 1 else "RGB"
            if self.family == "imagenet":
                short = round(self.size * 8 / 7)
                img.draft(mode, (short, short))
                img = img.convert(mode)
                scale = short / min(img.size)
                img = img.resize(
                    (max(short, round(img.width * scale)), max(short, round(img.height * scale)))
                )
            else:
                img = img.convert(mode)
                if img.size != (self.size, self.size):
                    img = img.resize((self.size, self.size))
            arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return self._geometry(arr, rng)

    def _geometry(self, arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.size
        if self.family == "cifar" and self.train:
            arr = np.pad(arr, ((4, 4), (4, 4), (0, 0)), mode="reflect")
        h, w = arr.shape[:2]
        if self.train and (h > s or w > s):
            top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        else:
            top, left = (h - s) // 2, (w - s) // 2
        arr = arr[top : top + s, left : left + s]
        if self.train and self.family != "small" and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return np.ascontiguousarray(arr)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data ``map_batches`` UDF: payload bytes -> ``image`` uint8 [N, H, W, C] and ``ok``."""
        rng = np.random.default_rng()
        n = len(batch["payload"])
        images = np.zeros((n, self.size, self.size, self.channels), dtype=np.uint8)
        ok = np.ones(n, dtype=bool)
        for i, payload in enumerate(batch["payload"]):
            try:
                images[i] = self.decode_one(bytes(payload), rng)
            except Exception:
                ok[i] = False
        out = label_columns(batch)
        out["image"], out["ok"] = images, ok
        return out


def label_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The id and label columns a transform passes through; a null true label (read as NaN) becomes -1."""
    out = {key: np.asarray(batch[key]) for key in ("sample_id", "given_label", "true_label")}
    true = out["true_label"]
    if true.dtype == object or np.issubdtype(true.dtype, np.floating):
        out["true_label"] = np.nan_to_num(true.astype(np.float64), nan=-1).astype(np.int64)
    return out


def normalize(images: torch.Tensor, family: str) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W], normalised with the family's mean and std."""
    mean, std = _MEAN_STD[family]
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    c = x.shape[1]
    mean_t = torch.tensor(mean * (c // len(mean)), device=x.device).view(1, c, 1, 1)
    std_t = torch.tensor(std * (c // len(std)), device=x.device).view(1, c, 1, 1)
    return (x - mean_t) / std_t
