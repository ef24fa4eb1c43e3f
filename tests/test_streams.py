"""A rank's trusted stream (``raynoisy.train.streams``): read once per run, replayed exactly on resume.

The trusted set is read into worker memory on the stream's first use and kept; each epoch's stream is a
new seeded shuffle of those rows, so a resumed epoch that skips its first steps sees the same trusted
batches the interrupted one would have. No Ray needed: a stage that trains on the trusted set draws no
training batch.
"""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raynoisy.data import pipeline
from raynoisy.data.pipeline import InputSpec
from raynoisy.methods.base import Stage
from raynoisy.train.preflight import resolve_config
from raynoisy.train.run_files import RunInfo
from raynoisy.train.streams import Streams

SIZE, ROWS, STEPS, BATCH = 8, 20, 6, 4
STAGE = Stage("trusted-only", 1, trains_on="trusted")


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE), value, dtype=np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def streams_factory(tmp_path):
    ids = np.arange(100, 100 + ROWS, dtype=np.int64)
    labels = (ids % 3).astype(np.int64)
    payloads = [_png(int(i)) for i in ids]
    table = pa.table({"sample_id": ids, "payload": payloads, "given_label": labels, "true_label": labels})
    path = tmp_path / "trusted-00000.parquet"
    pq.write_table(table, path)
    info = RunInfo(
        num_classes=3,
        input=InputSpec("small", SIZE, 1),
        files={"trusted": [str(path)]},
        counts={"trusted": ROWS},
        steps_per_epoch=STEPS,
        output=str(tmp_path),
        fault_marker=str(tmp_path / "fault"),
        actual_noise_rate=0.0,
        train_ids=None,
    )
    cfg = resolve_config("digits", "ce", flags={"run.output": str(tmp_path), "run.seed": 3})
    return lambda: Streams(cfg, info, rank=0, world_size=1, device=torch.device("cpu"))


def _ids(streams: Streams, epoch: int, skip: int = 0) -> list[list[int]]:
    pairs = streams.epoch(STAGE, epoch, BATCH, skip=skip)
    return [batch.sample_id.tolist() for batch, trusted in pairs if trusted is None]


def test_the_trusted_set_is_read_once_and_reshuffled_every_epoch(streams_factory, monkeypatch):
    reads = []
    read = pipeline.InMemorySplit.read.__func__

    def counting(cls, files, spec):
        reads.append(list(files))
        return read(cls, files, spec)

    monkeypatch.setattr(pipeline.InMemorySplit, "read", classmethod(counting))
    streams = streams_factory()
    epochs = [_ids(streams, epoch) for epoch in range(3)]
    assert len(reads) == 1, reads
    for batches in epochs:
        assert len(batches) == STEPS and all(len(b) == BATCH for b in batches)
        seen = [i for b in batches for i in b]
        assert sorted(seen[:ROWS]) == list(range(100, 100 + ROWS))  # one pass covers the set once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_a_resumed_epoch_replays_the_interrupted_trusted_batches(streams_factory):
    interrupted = streams_factory()
    _ids(interrupted, 0)
    whole = _ids(interrupted, 1)
    resumed = streams_factory()  # a new worker: nothing cached
    assert _ids(resumed, 1, skip=2) == whole[2:]
