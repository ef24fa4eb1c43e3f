"""Shards: round trip, manifest, idempotency, unreadable payloads; transforms: corrupt images skipped."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raynoisy.config import load_config
from raynoisy.data.catalog import Catalog, MissingPayloadError
from raynoisy.data.pipeline import BadSampleCounter, check_bad_fraction, to_batch
from raynoisy.data.plan import plan_labels
from raynoisy.data.shards import read_manifest, write_shards
from raynoisy.data.sources import load_catalog
from raynoisy.data.transforms import ImageTransform, normalize
from raynoisy.errors import TooManyBadSamplesError


def _digits_plan(tmp_path, **flags):
    cfg = load_config("digits", "ce", flags={"run.output": str(tmp_path), **flags})
    catalog = load_catalog("digits", None)
    return cfg, catalog, plan_labels(catalog, cfg)


def test_round_trip_and_manifest(tmp_path):
    _, catalog, plan = _digits_plan(tmp_path, **{"noise.type": "symmetric", "noise.rate": 0.4})
    shards = write_shards(
        catalog,
        plan,
        str(tmp_path / "shards"),
        seed=0,
        source_root=None,
        options={},
        rows_per_shard=300,
        log=lambda _: None,
    )
    rows = pq.read_table(sorted((tmp_path / "shards").glob("*/train/*.parquet"))).to_pandas()
    assert len(shards.files("train")) == -(-plan.counts()["train"] // 300)
    every = [pq.read_table(f) for split in shards.manifest["files"] for f in shards.files(split)]
    ids = np.concatenate([t.column("sample_id").to_numpy() for t in every])
    assert len(ids) == len(set(ids.tolist())) == len(plan.used())
    sample = rows.iloc[0]
    sid = int(sample["sample_id"])
    assert sample["payload"] == catalog.read_payload(sid)
    assert sample["given_label"] == plan.given[sid] and sample["true_label"] == plan.true[sid]
    manifest = shards.manifest
    assert manifest["counts"] == {k: v for k, v in plan.counts().items() if v and k != "unused"}
    assert manifest["noise"]["type"] == "symmetric"
    assert abs(manifest["noise"]["actual_rate"] - 0.4) < 0.01
    assert np.asarray(manifest["noise"]["empirical"]).shape == (10, 10)


def test_idempotent_and_fingerprinted(tmp_path):
    _, catalog, plan = _digits_plan(tmp_path)
    root = str(tmp_path / "shards")
    first = write_shards(catalog, plan, root, seed=0, source_root=None, options={}, log=lambda _: None)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*.parquet")}
    logs = []
    again = write_shards(catalog, plan, root, seed=0, source_root=None, options={}, log=logs.append)
    assert again.uri == first.uri and "reusing" in logs[0]
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*.parquet")}
    _, _, other = _digits_plan(tmp_path, **{"run.seed": 1})
    assert (
        write_shards(catalog, other, root, seed=1, source_root=None, options={}, log=lambda _: None).uri
        != first.uri
    )


def _catalog_with_missing(n: int, missing: set[int]) -> Catalog:
    def read(i: int) -> bytes:
        if i in missing:
            raise MissingPayloadError(f"images/{i}.jpg is missing")
        return b"x"

    labels = np.arange(n) % 2
    return Catalog("toy", "image", ["a", "b"], labels, labels, np.array(["train"] * n, dtype=object), read)


def test_missing_payload_skipped_and_recorded(tmp_path):
    cfg = load_config(
        "digits", "ce", flags={"run.output": str(tmp_path)}, overrides=["split.test_fraction=0.5"]
    )
    catalog = _catalog_with_missing(400, {3})
    plan = plan_labels(catalog, cfg)
    shards = write_shards(
        catalog,
        plan,
        str(tmp_path / "s"),
        seed=0,
        source_root=None,
        options={},
        max_bad_fraction=0.01,
        log=lambda _: None,
    )
    assert shards.skipped_ids.tolist() == [3]
    assert "images/3.jpg" in read_manifest(shards.uri)["skipped"][0]["reason"]
    assert sum(shards.manifest["counts"].values()) == 399


def test_too_many_missing_payloads_is_a_clear_error(tmp_path):
    cfg = load_config(
        "digits", "ce", flags={"run.output": str(tmp_path)}, overrides=["split.test_fraction=0.5"]
    )
    catalog = _catalog_with_missing(100, set(range(10)))
    with pytest.raises(TooManyBadSamplesError, match="10 of 100 samples could not be read"):
        write_shards(
            catalog,
            plan_labels(catalog, cfg),
            str(tmp_path / "s"),
            seed=0,
            source_root=None,
            options={},
            max_bad_fraction=0.05,
            log=lambda _: None,
        )


def _jpeg(color, size=40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_corrupt_image_skipped_and_counted():
    transform = ImageTransform("imagenet", 32, 3, train=True)
    batch = {
        "payload": np.array([_jpeg((255, 0, 0)), b"not an image", _jpeg((0, 0, 255))], dtype=object),
        "sample_id": np.array([5, 6, 7]),
        "given_label": np.array([0, 1, 2]),
        "true_label": np.array([0.0, np.nan, 2.0]),
    }
    out = transform(batch)
    assert out["ok"].tolist() == [True, False, True]
    assert out["image"].shape == (3, 32, 32, 3)
    assert out["true_label"].tolist() == [0, -1, 2]
    counter = BadSampleCounter()
    torch_batch = to_batch({k: torch.as_tensor(v) for k, v in out.items()}, "imagenet", counter)
    assert torch_batch.sample_id.tolist() == [5, 7]
    assert (counter.bad, counter.seen) == (1, 3)
    check_bad_fraction(1, 100, 0.01)
    with pytest.raises(TooManyBadSamplesError, match="2 of 100"):
        check_bad_fraction(2, 100, 0.01)


def test_augmentation_geometry():
    rng = np.random.default_rng(0)
    cifar = ImageTransform("cifar", 32, 3, train=True)
    img = cifar.decode_one(_jpeg((10, 200, 30), 32), rng)
    assert img.shape == (32, 32, 3)
    small = ImageTransform("small", 28, 1, train=True)
    gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    assert np.array_equal(small.decode_one(buf.getvalue(), rng)[:, :, 0], gray)  # identity for small images
    x = normalize(torch.full((2, 28, 28, 1), 255, dtype=torch.uint8), "small")
    assert x.shape == (2, 1, 28, 28) and torch.allclose(x, torch.ones_like(x))
