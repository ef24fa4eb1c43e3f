"""Images/s and CPU-seconds per image of the project's Ray Data pipeline against a torch DataLoader.

Both pipelines read the very same JPEG Parquet shards (the ``train`` split that ``raynoisy.train.driver``
writes for a Clothing1M-layout miniature), decode and augment every image with the same
``ImageTransform`` (resize, random crop, flip) and normalise it with the same ``to_batch``, so the only
difference is the machinery that moves the work onto the CPUs:

- ``ray-data``: ``sample_dataset`` (the shard reads planned once, read tasks that shuffle raw rows and
  decode them) consumed by one ``iter_torch_batches`` loop, exactly as a training worker consumes its shard;
- ``ray-data split x2``: the same Dataset through ``streaming_split(2, equal=True)``, each split drained by
  a consumer in a process of its own (a 0-CPU actor holding its split's iterator), as Ray Train feeds two
  workers (each takes half the global batch);
- ``dataloader``: a map-style ``torch.utils.data.Dataset`` over the same Parquet rows, decoding one sample
  at a time with ``ImageTransform.decode_one`` in ``num_workers`` worker processes, ``shuffle=True``.

Ray gets as many CPUs as the DataLoader gets workers, so both decode on the same number of cores. Each
pipeline runs one untimed warm-up epoch (worker start-up, page cache), then ``--epochs`` timed epochs; the
pipelines take turns within every round, so that load from other processes hits them alike. The table
reports the median epoch's images/s and the CPU-seconds it cost per image: user + system time of this
process and every process below it (DataLoader workers, and the Ray cluster when this script started it),
read from /proc, so CPU time the pipeline burns without delivering images (start-up, scheduling,
serialisation) counts against it. The ratio (Ray Data images/s / DataLoader images/s) is the number to read:
absolute times on a shared machine mean little (DESIGN.md, principle 7). Every epoch of every pipeline
must deliver the same sample ids, otherwise the benchmark fails instead of comparing different work.

    python benchmarks/data_ingest.py                          # ~2,000 train images, 224 crops of 256 px JPEGs
    python benchmarks/data_ingest.py --images-per-class 2050  # ~20,000 train images
    python benchmarks/data_ingest.py --small                  # CI size
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
import torch.utils.data

from raynoisy.config import Config, load_config
from raynoisy.data.batch import Batch
from raynoisy.data.miniature import build_miniature_clothing1m
from raynoisy.data.pipeline import (
    BadSampleCounter,
    InMemorySplit,
    InputSpec,
    iter_batches,
    quiet_ray_data,
    sample_dataset,
    to_batch,
)
from raynoisy.train.prepare import input_spec, prepare

DATALOADER = "dataloader"
RAY_DATA = "ray-data"
RAY_SPLIT = "ray-data split x2"
SPLIT_WAYS = 2

# Full size: ~2,000 train images take seconds per epoch on 2 cores, long enough for timer and start-up
# noise to matter little, and the JPEGs are generated in about a minute. --small: the smallest miniature
# the clean-set minimums allow (308 train images) at 64 px, for CI.
FULL = {"images_per_class": 200, "image_size": 224, "epochs": 3}
SMALL = {"images_per_class": 60, "image_size": 64, "epochs": 1}


@dataclass
class Epoch:
    """One pass of one pipeline: what it delivered and how long it took."""

    images: int
    seconds: float
    cpu_seconds: float | None  # CPU time of this process tree over the epoch; None where /proc is missing
    ids: np.ndarray  # sorted sample ids of every delivered image, duplicates kept


@dataclass
class Measurement:
    """All timed epochs of one pipeline (the warm-up epoch is checked but not kept)."""

    name: str
    epochs: list[Epoch] = field(default_factory=list)

    @property
    def images(self) -> int:
        return self.epochs[0].images

    @property
    def seconds(self) -> float:
        return statistics.median(e.seconds for e in self.epochs)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_per_image(self) -> float | None:
        """Median over the timed epochs of CPU-seconds per delivered image."""
        if any(e.cpu_seconds is None for e in self.epochs):
            return None
        return statistics.median(e.cpu_seconds / e.images for e in self.epochs)


@dataclass
class Report:
    """What ``main`` measured; the test reads it, users read the printed table."""

    results: dict[str, Measurement]
    expected_ids: np.ndarray  # sorted sample ids of the train shards
    ray_operators: list[str] = field(default_factory=list)  # Ray Data's per-operator summary, last epoch

    def ratio(self, name: str = RAY_DATA) -> float:
        return self.results[name].images_per_s / self.results[DATALOADER].images_per_s


class ParquetImageDataset(torch.utils.data.Dataset):
    """Map-style Dataset over the shard rows; JPEGs decoded one by one in the DataLoader's workers.

    This is what a user would write for a DataLoader: random access by index (so ``shuffle=True`` is a full
    per-epoch permutation), payload bytes read with pyarrow by the project's ``InMemorySplit`` (the same
    columns and null handling as the Ray path), and undecodable bytes marked ``ok = False`` instead of
    raising, so that ``to_batch`` skips and counts them exactly as it does for Ray Data batches.
    """

    def __init__(self, files: list[str], spec: InputSpec) -> None:
        self.rows = InMemorySplit.read(files, spec).rows
        self.transform = spec.transform(train=True)
        self.shape = (spec.size, spec.size, spec.channels)
        self._rng: np.random.Generator | None = None  # created in each worker process, after the fork

    def __len__(self) -> int:
        return len(self.rows["sample_id"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray | bool | int]:
        if self._rng is None:
            self._rng = np.random.default_rng()
        try:
            image, ok = self.transform.decode_one(bytes(self.rows["payload"][index]), self._rng), True
        except Exception:  # as in ImageTransform.__call__: skipped and counted, never fatal
            image, ok = np.zeros(self.shape, dtype=np.uint8), False
        return {
            "image": image,
            "ok": ok,
            "sample_id": self.rows["sample_id"][index],
            "given_label": self.rows["given_label"][index],
            "true_label": self.rows["true_label"][index],
        }


def dataloader_batches(files: list[str], spec: InputSpec, batch_size: int, workers: int) -> Iterator[Batch]:
    """One DataLoader epoch. The Dataset is built inside the epoch so that, like Ray Data, every epoch pays
    for reading the Parquet files (cheap next to JPEG decoding, but the comparison stays like for like)."""
    dataset = ParquetImageDataset(files, spec)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    for raw in loader:
        batch = to_batch(raw, spec.family, BadSampleCounter())
        if len(batch):
            yield batch


def _consume(batches: Iterable[Batch], out: list[np.ndarray]) -> None:
    """Drain a batch stream, keeping only the sample ids (what both pipelines must agree on)."""
    for batch in batches:
        out.append(batch.sample_id.numpy())


def tree_cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and every live process below it, each with the time of the
    children it has already reaped (the DataLoader's finished workers count through this process)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    children: dict[int, list[int]] = {}
    times: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while listed
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: ppid
        times[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime (clock ticks)
    total, stack = 0, [os.getpid()]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def timed_epoch(run_epoch: Callable[[list[np.ndarray]], None]) -> Epoch:
    """Time ``run_epoch(out)`` from before its pipeline starts until its last batch is consumed."""
    out: list[np.ndarray] = []
    cpu_start = tree_cpu_seconds()
    start = time.perf_counter()
    run_epoch(out)
    seconds = time.perf_counter() - start
    cpu_end = tree_cpu_seconds()
    cpu = None if cpu_start is None or cpu_end is None else cpu_end - cpu_start
    ids = np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)
    return Epoch(images=len(ids), seconds=seconds, cpu_seconds=cpu, ids=ids)


@dataclass
class Bench:
    """The shards, the input geometry and the three pipelines, each runnable one epoch at a time."""

    files: list[str]
    spec: InputSpec
    batch_size: int
    workers: int
    read_task_rows: int
    shuffle_rows: int | None
    split: bool

    def __post_init__(self) -> None:
        # Built once, like the driver builds the Dataset it hands to Ray Train; each epoch re-executes it.
        self.dataset = sample_dataset(self.files, self.spec, train=True, read_task_rows=self.read_task_rows)
        self.ranks: list[ray.actor.ActorHandle] = []  # one SplitRank per split, gone with this object
        if self.split:
            rank = ray.remote(num_cpus=0)(SplitRank)
            for split in self.dataset.streaming_split(SPLIT_WAYS, equal=True):
                self.ranks.append(
                    rank.remote(split, self.spec, self.batch_size // SPLIT_WAYS, self.shuffle_rows)
                )

    def pipelines(self) -> dict[str, Callable[[list[np.ndarray]], None]]:
        runs = {DATALOADER: self.run_dataloader, RAY_DATA: self.run_ray}
        if self.split:
            runs[RAY_SPLIT] = self.run_ray_split
        return runs

    def run_dataloader(self, out: list[np.ndarray]) -> None:
        _consume(dataloader_batches(self.files, self.spec, self.batch_size, self.workers), out)

    def run_ray(self, out: list[np.ndarray]) -> None:
        _consume(worker_batches(self.dataset, self.spec, self.batch_size, self.shuffle_rows), out)

    def run_ray_split(self, out: list[np.ndarray]) -> None:
        """Both split iterators must be consumed at once (they advance together), as two Train ranks do."""
        out.extend(ray.get([rank.epoch.remote() for rank in self.ranks]))


def worker_batches(
    iterable: ray.data.Dataset | ray.data.DataIterator,
    spec: InputSpec,
    batch_size: int,
    shuffle_rows: int | None,
) -> Iterator[Batch]:
    """Same call as the training worker's epoch loop, except ``drop_last=False`` so that every image is
    counted and both pipelines must deliver the same ids."""
    return iter_batches(
        iterable,
        batch_size=batch_size,
        family=spec.family,
        device=torch.device("cpu"),
        counter=BadSampleCounter(),
        drop_last=False,
        shuffle_rows=shuffle_rows,
    )


class SplitRank:
    """One Train rank's consumer, in a process of its own as Ray Train runs each rank: it holds its split's
    iterator (handed over once, as Train hands a worker its shard) and drains one epoch per call on one
    intra-op thread (a 1-CPU Train worker's)."""

    def __init__(
        self, iterator: ray.data.DataIterator, spec: InputSpec, batch_size: int, shuffle_rows: int | None
    ) -> None:
        torch.set_num_threads(1)
        self.iterator = iterator
        self.spec = spec
        self.batch_size = batch_size
        self.shuffle_rows = shuffle_rows

    def epoch(self) -> np.ndarray:
        """The sample ids of one epoch of this rank's split, in the order they came."""
        out: list[np.ndarray] = []
        _consume(worker_batches(self.iterator, self.spec, self.batch_size, self.shuffle_rows), out)
        return np.concatenate(out) if out else np.empty(0, np.int64)


if __name__ != "__main__":  # imported by path (the tests): Ray ships this module's classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def build_shards(
    workdir: Path, images_per_class: int, image_size: int, rows_per_shard: int | None
) -> tuple[list[str], InputSpec, Config]:
    """Generate the JPEG miniature and shard it through the driver's own ``prepare``.

    JPEGs are ``image_size * 8/7`` pixels (256 for 224), the side ``ImageTransform`` resizes to before it
    crops, as Clothing1M training code does with ~256 px images. Shards hold the preset's rows per file
    unless ``rows_per_shard`` says otherwise; Ray Data's read tasks draw row groups, not files, so the
    shard size does not set its decode parallelism.
    """
    jpeg_size = round(image_size * 8 / 7)
    root = build_miniature_clothing1m(
        workdir / f"clothing1m-{images_per_class}x{jpeg_size}",
        images_per_class=images_per_class,
        image_size=jpeg_size,
    )
    cfg = load_config(
        "clothing1m",
        "ce",
        flags={"data.root": str(root), "run.output": str(workdir / "run")},
        # The shard fingerprint does not cover rows_per_shard: it goes into the folder name (0: preset's).
        overrides=[
            f"data.shard_root={workdir / f'shards-r{rows_per_shard or 0}'}",
            f"data.image_size={image_size}",
        ]
        + ([f"data.rows_per_shard={rows_per_shard}"] if rows_per_shard else []),
    )
    prepared = prepare(cfg, log=lambda _: None)
    return prepared.shards.files("train"), input_spec(cfg), cfg


def check_same_ids(report: Report) -> None:
    """Fail loudly if the pipelines did not do the same work: a speed ratio over different images is void.

    ``streaming_split(equal=True)`` may drop up to ``SPLIT_WAYS - 1`` rows to keep the ranks in step.
    """
    for m in report.results.values():
        for e in m.epochs:
            if m.name == RAY_SPLIT:
                ok = len(np.unique(e.ids)) == len(e.ids) and np.isin(e.ids, report.expected_ids).all()
                ok = ok and e.images >= len(report.expected_ids) - (SPLIT_WAYS - 1)
            else:
                ok = np.array_equal(e.ids, report.expected_ids)
            if not ok:
                raise RuntimeError(
                    f"{m.name} delivered {e.images} images whose ids differ from the "
                    f"{len(report.expected_ids)} train samples in the shards"
                )


def operator_summary(dataset: ray.data.Dataset) -> list[str]:
    """One line per Ray Data operator of the last execution (tasks, blocks, wall time).

    Printed under the table because it explains the ratio: how many read-and-decode tasks ran and how long
    they took.
    """
    return [line.strip() for line in dataset.stats().splitlines() if line.startswith("Operator ")]


def format_table(report: Report) -> str:
    lines = [
        f"| {'pipeline':<18} | {'images':>6} | {'seconds':>7} | {'images/s':>8} | {'CPU-s/image':>11} "
        f"| {'epochs (s)':<22} |",
        f"|{'-' * 20}|{'-' * 8}|{'-' * 9}|{'-' * 10}|{'-' * 13}|{'-' * 24}|",
    ]
    for m in report.results.values():
        spread = ", ".join(f"{e.seconds:.2f}" for e in m.epochs)
        cpu = "n/a" if m.cpu_per_image is None else f"{m.cpu_per_image:.4f}"
        lines.append(
            f"| {m.name:<18} | {m.images:>6} | {m.seconds:>7.2f} | {m.images_per_s:>8.1f} | {cpu:>11} "
            f"| {spread:<22} |"
        )
    names = [RAY_DATA] + ([RAY_SPLIT] if RAY_SPLIT in report.results else [])
    for name in names:
        lines.append(f"ratio {name} / DataLoader (images/s): {report.ratio(name):.2f}x")
    loader_cpu = report.results[DATALOADER].cpu_per_image
    for name in names:
        cpu = report.results[name].cpu_per_image
        if cpu is not None and loader_cpu:
            lines.append(f"ratio {name} / DataLoader (CPU-s per image): {cpu / loader_cpu:.2f}x")
    lines += [f"[ray-data, last epoch] {line}" for line in report.ray_operators]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images-per-class", type=int, help=f"miniature size (default {FULL['images_per_class']})"
    )
    parser.add_argument(
        "--image-size", type=int, help=f"crop side; JPEGs are 8/7 of it (default {FULL['image_size']})"
    )
    parser.add_argument("--batch-size", type=int, help="global batch (default: the clothing1m preset's, 32)")
    parser.add_argument(
        "--epochs", type=int, help=f"timed epochs after the warm-up (default {FULL['epochs']})"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = Ray CPUs (default 2)")
    parser.add_argument(
        "--rows-per-shard", type=int, help="Parquet rows per shard file (default: the clothing1m preset's)"
    )
    parser.add_argument("--workdir", type=Path, help="where the JPEGs and shards go (default: a temp dir)")
    parser.add_argument(
        "--no-split", action="store_true", help=f"skip the streaming_split x{SPLIT_WAYS} variant"
    )
    parser.add_argument("--small", action="store_true", help="CI size: smallest miniature, 64 px, one epoch")
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.epochs, args.workers, args.rows_per_shard or 1) < 1:
        parser.error("--epochs, --workers and --rows-per-shard must be >= 1")
    return args


def run(args: argparse.Namespace, workdir: Path) -> Report:
    files, spec, cfg = build_shards(workdir, args.images_per_class, args.image_size, args.rows_per_shard)
    batch_size = args.batch_size or cfg.optim.batch_size
    expected = np.sort(InMemorySplit.read(files, spec).rows["sample_id"].astype(np.int64))
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    threads = torch.get_num_threads()
    # The consumer (batch normalisation) runs on one intra-op thread in both pipelines, as in a 1-CPU Ray
    # Train worker (Ray sets OMP_NUM_THREADS to its CPUs); a second OpenMP thread would only fight the
    # two decoding processes for the same two cores.
    torch.set_num_threads(1)
    try:
        report = measure(args, files, spec, cfg, batch_size, expected)
    finally:
        torch.set_num_threads(threads)
        if started_ray:
            ray.shutdown()
    print(format_table(report), flush=True)
    return report


def measure(
    args: argparse.Namespace,
    files: list[str],
    spec: InputSpec,
    cfg: Config,
    batch_size: int,
    expected: np.ndarray,
) -> Report:
    """Warm up every pipeline once, then time ``args.epochs`` rounds in rotating order."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    quiet_ray_data()
    print(
        f"[ingest] {len(expected)} train images in {len(files)} Parquet shards, JPEG "
        f"{round(spec.size * 8 / 7)} px -> {spec.size} px crop ({spec.family} transforms), "
        f"batch {batch_size}; "
        f"DataLoader num_workers={args.workers}, Ray cluster {cpus} CPUs, consumer on 1 torch thread; "
        f"1 warm-up + {args.epochs} timed epochs each, median reported; "
        f"Ray Data read tasks of {cfg.data.read_task_rows} rows",
        flush=True,
    )
    bench = Bench(
        files,
        spec,
        batch_size,
        args.workers,
        cfg.data.read_task_rows,
        cfg.data.shuffle_buffer_rows,
        split=not args.no_split,
    )
    pipelines = bench.pipelines()
    results = {name: Measurement(name) for name in pipelines}
    report = Report(results, expected)
    names = list(pipelines)
    for name in names:
        warm = Measurement(name, [timed_epoch(pipelines[name])])
        check_same_ids(Report({name: warm}, expected))
    for round_ in range(args.epochs):
        # Rotate who goes first, so that a burst of load from other processes does not always hit one.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            results[name].epochs.append(timed_epoch(pipelines[name]))
    check_same_ids(report)
    report.ray_operators = operator_summary(bench.dataset)
    return report


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark, print its table and ratio lines, and return what was measured."""
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="raynoisy-ingest-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    main()
