"""Parquet shards of a planned data set, with a manifest; local paths or any pyarrow filesystem URI.

Layout under ``<shard_root>/<dataset>-<fingerprint>/``: ``<split>/part-NNNNN.parquet`` with columns
sample_id (int64), payload (binary: encoded image bytes, or UTF-8 text), given_label (int64),
true_label (int64, null where unknown), split (string); and ``manifest.json``, written last, so a
directory with a manifest is complete. The fingerprint hashes the source, its root and options, and the
whole label plan (hence seed, noise and split config): re-running with the same inputs reuses the shards.

Rows are shuffled (seeded) within each split before they are cut into shards, so that file-level
shuffling in the Ray Data pipeline mixes classes even when a source lists its files class by class.
Payloads that cannot be read are skipped and recorded; past ``max_bad_fraction`` sharding fails. Progress:
one line per shard written, with the samples per second and the ETA of the whole set.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raynoisy.data.catalog import UNKNOWN_LABEL, Catalog, MissingPayloadError
from raynoisy.data.plan import LabelPlan
from raynoisy.data.splits import UNUSED
from raynoisy.errors import TooManyBadSamplesError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_IO_THREADS = 16
# Parquet row group: the unit a training read task draws (raynoisy.data.shard_reads), so a shard of 4,096
# rows is 64 pieces the pipeline deals to different tasks, with different companions, every epoch.
ROW_GROUP_ROWS = 64


@dataclass
class ShardSet:
    """A complete, written shard directory and its manifest."""

    uri: str
    manifest: dict

    def files(self, split: str) -> list[str]:
        return [f"{self.uri}/{name}" for name in self.manifest["files"].get(split, [])]

    def count(self, split: str) -> int:
        return int(self.manifest["counts"].get(split, 0))

    @property
    def skipped_ids(self) -> np.ndarray:
        return np.asarray([s["sample_id"] for s in self.manifest["skipped"]], dtype=np.int64)


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or a pyarrow URI (s3://, gs://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    path = str(Path(uri).expanduser().resolve())
    return pafs.LocalFileSystem(), path


def fingerprint(catalog: Catalog, plan: LabelPlan, source_root: str | None, options: dict) -> str:
    h = hashlib.sha256()
    header = {"v": FORMAT_VERSION, "source": catalog.name, "root": source_root, "options": options}
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    for arr in (plan.split.astype(str), plan.given, plan.true):
        h.update(np.ascontiguousarray(arr).tobytes() if arr.dtype != object else "|".join(arr).encode())
    return h.hexdigest()[:16]


def read_manifest(uri: str) -> dict | None:
    fs, path = filesystem_of(uri)
    info = fs.get_file_info(f"{path}/{MANIFEST}")
    if info.type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
        return json.loads(f.read().decode())


def _read_payloads(catalog: Catalog, ids: np.ndarray) -> tuple[list, list[dict]]:
    """Read payloads with a thread pool (file reads release the GIL); unreadable ones are recorded."""

    def read(i: int) -> bytes | str | Exception:
        try:
            return catalog.read_payload(int(i))
        except (MissingPayloadError, OSError) as exc:
            return exc

    with ThreadPoolExecutor(_IO_THREADS) as pool:
        results = list(pool.map(read, ids))
    skipped = [
        {"sample_id": int(i), "reason": str(r)}
        for i, r in zip(ids, results, strict=True)
        if isinstance(r, Exception)
    ]
    return results, skipped


def _shard_table(catalog: Catalog, plan: LabelPlan, ids: np.ndarray, payloads: list, split: str) -> pa.Table:
    keep = [not isinstance(p, Exception) for p in payloads]
    ids = ids[keep]
    data = [p.encode() if isinstance(p, str) else p for p, k in zip(payloads, keep, strict=True) if k]
    true = plan.true[ids]
    return pa.table(
        {
            "sample_id": pa.array(ids, pa.int64()),
            "payload": pa.array(data, pa.binary()),
            "given_label": pa.array(plan.given[ids], pa.int64()),
            "true_label": pa.array(true, pa.int64(), mask=true == UNKNOWN_LABEL),
            "split": pa.array([split] * len(ids), pa.string()),
        }
    )


def write_shards(
    catalog: Catalog,
    plan: LabelPlan,
    shard_root: str,
    *,
    seed: int,
    source_root: str | None,
    options: dict,
    rows_per_shard: int = 4096,
    max_bad_fraction: float = 0.01,
    log=print,
) -> ShardSet:
    """Write (or reuse) the shards of ``plan``. Returns the complete ShardSet."""
    fp = fingerprint(catalog, plan, source_root, options)
    uri = f"{shard_root.rstrip('/')}/{catalog.name}-{fp}"
    existing = read_manifest(uri)
    if existing is not None:
        log(f"[shard] reusing {uri} ({sum(existing['counts'].values())} samples)")
        return ShardSet(uri, existing)
    fs, base = filesystem_of(uri)
    fs.create_dir(base, recursive=True)
    rng = np.random.default_rng([seed, 3])
    files: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    skipped: list[dict] = []
    start = time.time()
    used = plan.used()
    done = 0
    for split in sorted(set(plan.split[used].tolist()) - {UNUSED}):
        ids = np.flatnonzero(plan.split == split).astype(np.int64)
        ids = ids[rng.permutation(len(ids))]
        files[split], counts[split] = [], 0
        for part, lo in enumerate(range(0, len(ids), rows_per_shard)):
            chunk = ids[lo : lo + rows_per_shard]
            payloads, bad = _read_payloads(catalog, chunk)
            skipped += bad
            table = _shard_table(catalog, plan, chunk, payloads, split)
            name = f"{split}/part-{part:05d}.parquet"
            fs.create_dir(f"{base}/{split}", recursive=True)
            pq.write_table(table, f"{base}/{name}", filesystem=fs, row_group_size=ROW_GROUP_ROWS)
            files[split].append(name)
            counts[split] += table.num_rows
            done += len(chunk)
            rate = done / max(1e-9, time.time() - start)
            log(
                f"[shard] {split}: {counts[split]}/{len(ids)} written ({done}/{len(used)} total, "
                f"{rate:.0f} samples/s, eta {(len(used) - done) / rate:.0f} s)"
            )
    if len(skipped) > max_bad_fraction * max(1, len(used)):
        first = skipped[0]
        raise TooManyBadSamplesError(
            f"{len(skipped)} of {len(used)} samples could not be read (limit {max_bad_fraction:.1%}); "
            f"first: sample {first['sample_id']}: {first['reason']}; "
            "fix the data or raise data.max_bad_fraction"
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "source": catalog.name,
        "source_root": source_root,
        "options": options,
        "modality": catalog.modality,
        "class_names": catalog.class_names,
        "seed": seed,
        "noise": plan.noise.to_dict(),
        "counts": counts,
        "files": files,
        "skipped": skipped,
        "description": catalog.description,
    }
    with fs.open_output_stream(f"{base}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=1, default=str).encode())
    if skipped:
        log(f"[shard] skipped {len(skipped)} unreadable samples (listed in the manifest)")
    return ShardSet(uri, manifest)
