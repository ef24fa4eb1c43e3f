"""Per-sample state (soft labels, losses, clean probabilities) by ``sample_id``, identical on every rank.

Several methods keep values per training sample across epochs: MixNN's EMA soft labels and GMM clean
probabilities, per-sample losses, corrected labels for ``label_issues.parquet``. Shards and batches carry a
``sample_id`` (int64, arbitrary, not contiguous), and Ray Data hands any sample to any rank in any epoch, so
every rank must be able to read and write every row. ``SampleStore`` keeps the whole training split's state on
every rank, in host memory, and keeps the replicas bit-identical by making writes collective.

Why host memory (CPU torch tensors): accelerator memory belongs to the model, its activations and the
meta-step's extra passes; a step reads and writes one batch of rows, so only those rows travel to the device
(``gather(..., device=...)`` moves the compact rows and densifies them there).

Why top-k soft labels. Bytes per sample, per storage kind:

- dense column, ``width`` values: ``width * itemsize`` -- float32 ``4 * width``, float16/bfloat16
  ``2 * width``, int64 ``8 * width``, bool/uint8 ``width``. A per-sample loss (float32, width 1) costs 4 B.
- top-k soft labels, ``k`` entries: ``k * (2 + 2)`` B with int16 class indices (``num_classes < 32768``),
  ``k * (2 + 4)`` B with int32 indices; the values are float16. k=10: 40 B (60 B with int32 indices).
- the id index (the sorted ``sample_id`` array that maps ids to rows): 8 B.

At WebVision 1.0 scale (2.4M training images x 1,000 classes) a dense float32 soft label is 4,000 B per
sample, 9.6 GB per replica and so 9.6 GB on every rank (77 GB of host memory on an 8-GPU node); dense float16
halves that. Top-10 in float16 with int16 indices is 40 B per sample, 96 MB per replica: 100x less. A
noisy-label soft label is concentrated on a few classes (the given label, the model's prediction, their
confusable neighbours), so the mass beyond the top 10 is typically small; it is dropped and the kept entries
are renormalised (before the float16 cast, so any scale of input keeps float16's full relative precision).
``gather`` returns the dense, renormalised float32 distribution the losses expect; a row never written (or
written as all zeros) reads as the uniform distribution, "nothing known yet".

Why collective writes. ``scatter`` is a collective when torch.distributed is initialised with more than one
rank: every rank passes its own rows (any count, zero included), the rows are all-gathered in their compact
storage form (three ``all_gather`` calls: the counts with a consistency header, the padded row indices, the
padded row bytes) and every rank applies all ranks' rows in rank order. So every replica applies the same
bytes in the same order and stays bit-identical without a service round trip (an actor holding the state
would cost a network hop per batch and be one more thing to lose). The traffic per step is
``world * max_count * bytes_per_row``: 8 ranks x 256 rows x 40 B = 80 KB for top-10 soft labels.
**Rule for duplicates: the last write wins** -- within one rank's call the later position, across ranks the
higher rank (the same result as applying the ranks' calls one after another in rank order). A rank that
passes bad input (unknown ids, a wrong shape, a column another rank did not name) makes every rank raise in
the same call instead of leaving the others waiting in a collective. With one rank ``scatter`` is a local
write through the same encode/apply path, so one and many ranks store the same bytes.

Checkpoints. Rows are range-partitioned by rank (rank ``r`` of ``w`` owns rows ``[r*n//w, (r+1)*n//w)``), and
``save`` writes only the calling rank's block, so at scale each rank writes 1/world of the store and the
writes run in parallel. The file is ``sample_store-<rank>-of-<world>.pt``: a ``torch.save`` dict of plain
tensors, ints and strings (readable with ``torch.load(weights_only=True)``): the block's sample ids and, per
column, its kind, spec and the block of its storage tensors, plus the digest of the whole store. Files are
written to a temporary name and renamed, so a crash never leaves a truncated shard under the final name.
``load`` reads every shard present, whatever world size wrote them, checks that they form one complete save
(one world size, every rank, contiguous blocks, the same store digest in every shard) and restores every
column exactly; the restored store's digest must equal the saved one.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from raynoisy.errors import RaynoisyError

SHARD_PATTERN = re.compile(r"^sample_store-(\d+)-of-(\d+)\.pt$")
FORMAT = "raynoisy.sample_store"
FORMAT_VERSION = 1
ID_BYTES = 8  # the sorted int64 id index
INT16_CLASS_LIMIT = 32768  # num_classes below this store class indices as int16
_SHOWN_IDS = 5

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}

IdsLike = Tensor | np.ndarray | Sequence[int]


class UnknownSampleIdError(ValueError):
    """Sample ids that are not in the store's training split (a batch from another split, or stale ids)."""


class SampleStoreCheckpointError(RaynoisyError):
    """A checkpoint directory does not hold one complete, consistent save of this store."""


def shard_name(rank: int, world_size: int) -> str:
    """File name of rank ``rank``'s block in a save by ``world_size`` ranks."""
    return f"sample_store-{rank}-of-{world_size}.pt"


def partition(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` that rank ``rank`` of ``world_size`` saves: contiguous, sizes differ by <= 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _row_numel(t: Tensor) -> int:
    return math.prod(t.shape[1:])


def _as_bytes(t: Tensor) -> Tensor:
    """The bytes of a [rows, ...] tensor as uint8 of shape [rows, row_bytes] (no copy if contiguous)."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], _row_numel(t) * t.element_size())


def _from_bytes(raw: Tensor, dtype: torch.dtype, width: int) -> Tensor:
    """Inverse of ``_as_bytes`` for a [rows, width] tensor of ``dtype``."""
    return raw.contiguous().view(dtype).reshape(raw.shape[0], width)


class _Column:
    """One registered column: its storage tensors (all [num_samples, ...]) and the codec of one row."""

    kind: ClassVar[str]

    def __init__(self, name: str, tensors: dict[str, Tensor]) -> None:
        self.name = name
        self.tensors = tensors

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def row_bytes(self) -> int:
        return sum(_row_numel(t) * t.element_size() for t in self.tensors.values())

    def code(self) -> int:
        """A 31-bit code of name, kind and spec: ranks compare it before exchanging rows."""
        return zlib.crc32(f"{self.name}|{self.kind}|{sorted(self.spec().items())}".encode()) & 0x7FFFFFFF

    def encode(self, values: Tensor, count: int) -> Tensor:
        """Validate one call's values and return their storage bytes, [count, row_bytes] uint8 on the CPU."""
        raise NotImplementedError

    def apply(self, rows: Tensor, payload: Tensor) -> None:
        """Write encoded rows (unique row indices) into the storage tensors."""
        offset = 0
        for t in self.tensors.values():
            width = _row_numel(t)
            size = width * t.element_size()
            t.index_copy_(0, rows, _from_bytes(payload[:, offset : offset + size], t.dtype, width))
            offset += size

    def gather(self, rows: Tensor, device: torch.device) -> Tensor:
        raise NotImplementedError


class _DenseColumn(_Column):
    kind = "dense"

    def __init__(self, name: str, data: Tensor, fill: float) -> None:
        super().__init__(name, {"data": data})
        self.fill = fill

    @property
    def data(self) -> Tensor:
        return self.tensors["data"]

    def spec(self) -> dict[str, Any]:
        return {"width": self.data.shape[1], "dtype": _dtype_name(self.data.dtype)}

    def encode(self, values: Tensor, count: int) -> Tensor:
        values = torch.as_tensor(values)
        width = self.data.shape[1]
        if values.dim() == 1 and width == 1:
            values = values.unsqueeze(1)
        if tuple(values.shape) != (count, width):
            raise ValueError(
                f"column {self.name!r}: values of shape {tuple(values.shape)} for {count} sample ids; "
                f"expected ({count}, {width})" + (f" or ({count},)" if width == 1 else "")
            )
        if values.is_floating_point() and not self.data.is_floating_point():
            raise TypeError(
                f"column {self.name!r} stores {_dtype_name(self.data.dtype)}; got "
                f"{_dtype_name(values.dtype)} values (round them explicitly)"
            )
        return _as_bytes(values.detach().to(device="cpu", dtype=self.data.dtype))

    def gather(self, rows: Tensor, device: torch.device) -> Tensor:
        out = self.data.index_select(0, rows).to(device)
        if out.is_floating_point() and out.dtype != torch.float64:
            out = out.float()
        return out


class _TopKColumn(_Column):
    kind = "topk"

    def __init__(self, name: str, values: Tensor, indices: Tensor, num_classes: int) -> None:
        super().__init__(name, {"values": values, "indices": indices})
        self.num_classes = num_classes

    @property
    def k(self) -> int:
        return self.tensors["values"].shape[1]

    def spec(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "k": self.k}

    def encode(self, values: Tensor, count: int) -> Tensor:
        values = torch.as_tensor(values)
        if tuple(values.shape) != (count, self.num_classes):
            raise ValueError(
                f"column {self.name!r}: values of shape {tuple(values.shape)} for {count} sample ids; "
                f"expected dense probabilities of shape ({count}, {self.num_classes})"
            )
        if not values.is_floating_point():
            raise TypeError(f"column {self.name!r}: probabilities must be floating point, got {values.dtype}")
        probs = values.detach().float()
        if count and not bool(probs.min() >= 0):  # NaN propagates through min and fails too
            raise ValueError(
                f"column {self.name!r}: probabilities must be >= 0 (got negatives or NaN: logits?)"
            )
        top, index = torch.topk(probs, self.k, dim=1)
        if count and not bool(torch.isfinite(top).all()):
            raise ValueError(f"column {self.name!r}: probabilities must be finite")
        # renormalised before the float16 cast: full float16 precision for any scale, no overflow of counts
        total = top.sum(dim=1, keepdim=True)
        top = torch.where(total > 0, top / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        top = top.to(device="cpu", dtype=torch.float16)
        index = index.to(device="cpu", dtype=self.tensors["indices"].dtype)
        return torch.cat([_as_bytes(top), _as_bytes(index)], dim=1)

    def gather(self, rows: Tensor, device: torch.device) -> Tensor:
        # normalised on the host while still compact ([B, k]); only the densified rows are [B, num_classes]
        top = self.tensors["values"].index_select(0, rows).float()
        total = top.sum(dim=1, keepdim=True)
        top /= total.clamp_min(torch.finfo(torch.float32).tiny)
        index = self.tensors["indices"].index_select(0, rows).to(device).long()
        dense = torch.zeros(len(rows), self.num_classes, device=device)
        dense.scatter_(1, index, top.to(device))
        empty = total.squeeze(1) == 0
        if bool(empty.any()):  # a host tensor: no device synchronisation
            dense[empty.to(device)] = 1.0 / self.num_classes
        return dense


def _index_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes < INT16_CLASS_LIMIT else torch.int32


def _digest(ids: np.ndarray, columns: Iterable[_Column]) -> str:
    """16 hex digits of BLAKE2b over the id index and every column's name, spec and bytes (sorted by name)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{len(ids)}|".encode())
    h.update(np.ascontiguousarray(ids, dtype=np.int64).data)
    for column in sorted(columns, key=lambda c: c.name):
        h.update(f"|{column.name}|{column.kind}|{sorted(column.spec().items())}|".encode())
        for key, t in column.tensors.items():
            h.update(key.encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _world(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the exchange buffers must live: a CUDA device for an NCCL-only group, the CPU otherwise."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t: Tensor, world: int, group: dist.ProcessGroup | None, device: torch.device) -> list[Tensor]:
    t = t.to(device)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [o.cpu() for o in out]


def _keep_last(rows: np.ndarray) -> np.ndarray | None:
    """Positions of the last occurrence of each row, ascending; None when no row repeats."""
    reverse_first = np.unique(rows[::-1], return_index=True)[1]
    if len(reverse_first) == len(rows):
        return None
    return np.sort(len(rows) - 1 - reverse_first)


@dataclass
class _Shard:
    path: Path
    rank: int
    world_size: int


class SampleStore:
    """Per-sample columns over a training split, addressed by ``sample_id``; see the module docstring.

    ``sample_ids`` is the sorted (strictly increasing) int64 id array of the split; row ``i`` of every column
    belongs to ``sample_ids[i]``. ``group`` is the process group ``scatter`` synchronises over (the default
    group when torch.distributed is initialised).
    """

    def __init__(self, sample_ids: IdsLike, group: dist.ProcessGroup | None = None) -> None:
        ids = _id_array(sample_ids, "sample_ids").copy()  # owned: the caller's array stays writable
        if len(ids) == 0:
            raise ValueError("a SampleStore needs at least one sample id")
        steps = np.diff(ids)
        if (steps <= 0).any():
            at = int(np.flatnonzero(steps <= 0)[0])
            raise ValueError(
                f"sample_ids must be sorted and unique (strictly increasing): position {at} holds "
                f"{ids[at]} and position {at + 1} holds {ids[at + 1]}; pass np.unique(ids)"
            )
        self._ids = ids
        self._ids.setflags(write=False)
        self._ids_code = zlib.crc32(ids.data) & 0x7FFFFFFF
        self._columns: dict[str, _Column] = {}
        self.group = group

    # -- shape ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, name: object) -> bool:
        return name in self._columns

    @property
    def sample_ids(self) -> np.ndarray:
        """The sorted id index (read-only)."""
        return self._ids

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def add_dense(self, name: str, width: int, dtype: torch.dtype = torch.float32, fill: float = 0.0) -> None:
        """Register a dense column of ``width`` values of ``dtype`` per sample, every row set to ``fill``."""
        self._check_new(name)
        if width < 1:
            raise ValueError(f"column {name!r}: width must be >= 1, got {width}")
        if dtype not in _DTYPES.values():
            raise TypeError(f"column {name!r}: dtype {dtype} is not one of {sorted(_DTYPES)}")
        if not (dtype.is_floating_point or float(fill).is_integer()):
            raise ValueError(f"column {name!r}: fill {fill} is not a value of {_dtype_name(dtype)}")
        data = torch.full((len(self), width), fill, dtype=dtype)
        self._columns[name] = _DenseColumn(name, data, fill)

    def add_topk(self, name: str, num_classes: int, k: int) -> None:
        """Register a soft-label column that keeps the ``k`` largest of ``num_classes`` probabilities per row.

        Values are float16, class indices int16 when ``num_classes < 32768`` (else int32). Every row starts
        empty and reads as the uniform distribution until written.
        """
        self._check_new(name)
        if num_classes < 1 or not 1 <= k <= num_classes:
            raise ValueError(
                f"column {name!r}: need 1 <= k <= num_classes, got k={k}, num_classes={num_classes}"
            )
        values = torch.zeros(len(self), k, dtype=torch.float16)
        indices = torch.arange(k, dtype=_index_dtype(num_classes)).repeat(len(self), 1)
        self._columns[name] = _TopKColumn(name, values, indices, num_classes)

    def bytes_per_sample(self, name: str | None = None) -> int:
        """Host bytes per sample of column ``name``, or of all columns plus the 8-byte id index."""
        if name is not None:
            return self._column(name).row_bytes()
        return ID_BYTES + sum(c.row_bytes() for c in self._columns.values())

    def nbytes(self) -> int:
        """Host bytes the store holds: ``len(self) * bytes_per_sample()``."""
        return len(self) * self.bytes_per_sample()

    def tensors(self) -> dict[str, Tensor]:
        """The storage tensors by ``<column>.<part>`` (for ``assert_replicas_identical``); do not modify."""
        return {f"{c.name}.{key}": t for c in self._columns.values() for key, t in c.tensors.items()}

    def digest(self) -> str:
        """A short hash (16 hex digits) of the ids and every column's spec and bytes, for replica checks."""
        return _digest(self._ids, self._columns.values())

    # -- reading and writing -----------------------------------------------------------------------------

    def rows(self, sample_ids: IdsLike) -> Tensor:
        """Row indices (int64, CPU) of ``sample_ids``; raises ``UnknownSampleIdError`` naming unknown ids."""
        ids = _id_array(sample_ids, "sample ids")
        pos = np.searchsorted(self._ids, ids)
        known = self._ids[np.minimum(pos, len(self._ids) - 1)] == ids
        if not known.all():
            unknown = np.unique(ids[~known])
            shown = ", ".join(str(i) for i in unknown[:_SHOWN_IDS])
            more = f" and {len(unknown) - _SHOWN_IDS} more" if len(unknown) > _SHOWN_IDS else ""
            raise UnknownSampleIdError(
                f"{len(unknown)} sample id(s) not in this store's training split: {shown}{more}"
            )
        return torch.from_numpy(pos.astype(np.int64, copy=False))

    def gather(self, name: str, sample_ids: IdsLike, device: torch.device | str = "cpu") -> Tensor:
        """Column ``name``'s rows for ``sample_ids`` on ``device``; local, not a collective.

        Dense float16/bfloat16/float32 columns come back as float32 (float64 stays float64), integer and bool
        columns in their own dtype, shape [B, width]. Top-k columns come back as the dense renormalised
        float32 distribution [B, num_classes] (uniform for a row never written).
        """
        return self._column(name).gather(self.rows(sample_ids), torch.device(device))

    def scatter(self, name: str, sample_ids: IdsLike, values: Tensor) -> None:
        """Write ``values`` for ``sample_ids`` into column ``name``; a COLLECTIVE with more than one rank.

        Dense columns take [B, width] (or [B] for width 1), cast to the column's dtype; top-k columns take
        dense probabilities [B, num_classes] and keep the k largest, renormalised. With several ranks every
        rank must call this for the same column (with its own rows, possibly none) and every rank ends up
        with every rank's rows; a repeated id keeps the last write (a higher rank beats a lower one).
        The top-k selection runs on the device ``values`` are on; only the compact rows reach the host.
        """
        world = _world(self.group)
        if world == 1:
            column = self._column(name)
            rows = self.rows(sample_ids)
            self._apply(column, rows, column.encode(values, len(rows)))
            return
        self._scatter_collective(name, sample_ids, values, world)

    def _scatter_collective(self, name: str, sample_ids: IdsLike, values: Tensor, world: int) -> None:
        failure: Exception | None = None
        column: _Column | None = self._columns.get(name)
        rows = torch.zeros(0, dtype=torch.int64)
        payload = torch.zeros(0, 0, dtype=torch.uint8)
        try:
            column = self._column(name)
            rows = self.rows(sample_ids)
            payload = column.encode(values, len(rows))
        except Exception as error:  # every rank must learn of it in the header exchange, or the others hang
            failure = error
            rows = torch.zeros(0, dtype=torch.int64)
        device = _collective_device(self.group)
        code = column.code() if column is not None else -1
        header = torch.tensor([len(rows), int(failure is None), code, self._ids_code], dtype=torch.int64)
        headers = torch.stack(_all_gather(header, world, self.group, device))
        failed = [r for r in range(world) if not headers[r, 1]]
        if failed:
            if failure is not None:
                raise failure
            raise ValueError(f"SampleStore.scatter({name!r}) failed on rank(s) {failed}; see their error")
        mismatched = [r for r in range(world) if not torch.equal(headers[r, 2:], headers[0, 2:])]
        if mismatched:
            names: list[Any] = [None] * world
            dist.all_gather_object(names, name, group=self.group)
            raise ValueError(
                f"SampleStore.scatter: ranks disagree on the column or the store (columns by rank: {names}; "
                f"ranks {mismatched} differ from rank 0 in column spec or sample ids)"
            )
        assert column is not None
        counts = headers[:, 0].tolist()
        most = max(counts)
        if most == 0:
            return
        padded_rows = torch.zeros(most, dtype=torch.int64)
        padded_rows[: len(rows)] = rows
        padded = torch.zeros(most, column.row_bytes(), dtype=torch.uint8)
        padded[: len(rows)] = payload
        all_rows = _all_gather(padded_rows, world, self.group, device)
        all_payload = _all_gather(padded, world, self.group, device)
        self._apply(
            column,
            torch.cat([r[:n] for r, n in zip(all_rows, counts, strict=True)]),
            torch.cat([p[:n] for p, n in zip(all_payload, counts, strict=True)]),
        )

    @staticmethod
    def _apply(column: _Column, rows: Tensor, payload: Tensor) -> None:
        keep = _keep_last(rows.numpy())
        if keep is not None:
            index = torch.from_numpy(keep)
            rows, payload = rows[index], payload[index]
        column.apply(rows, payload)

    # -- checkpoints -------------------------------------------------------------------------------------

    def save(
        self, directory: str | os.PathLike[str], rank: int | None = None, world_size: int | None = None
    ) -> Path:
        """Write this rank's rows to ``directory/sample_store-<rank>-of-<world>.pt``; return the path.

        ``rank``/``world_size`` default to the process group's. Not a collective: every rank calls it for its
        own block (the store is identical everywhere, so any rank may write any block).
        """
        if world_size is None:
            world_size = _world(self.group)
        if rank is None:
            rank = dist.get_rank(self.group) if world_size > 1 else 0
        start, stop = partition(len(self), rank, world_size)
        shard = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "rank": rank,
            "world_size": world_size,
            "start": start,
            "stop": stop,
            "num_samples": len(self),
            "digest": self.digest(),
            "sample_ids": torch.from_numpy(self._ids[start:stop].copy()),
            # clone: torch.save of a slice would write the whole storage
            "columns": [
                {
                    "name": c.name,
                    "kind": c.kind,
                    "spec": c.spec(),
                    "fill": getattr(c, "fill", 0.0),
                    "tensors": {key: t[start:stop].clone() for key, t in c.tensors.items()},
                }
                for c in self._columns.values()
            ],
        }
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / shard_name(rank, world_size)
        partial = directory / f".{path.name}.{os.getpid()}.partial"
        torch.save(shard, partial)
        os.replace(partial, path)
        return path

    def load(self, directory: str | os.PathLike[str]) -> None:
        """Restore every column from a save by any number of ranks; the store changes only if all checks pass.

        The checkpoint must be over the same sample ids. Its columns replace the registered ones of the same
        name (whose kind and spec must match); checkpoint columns not registered yet are added; a registered
        column missing from the checkpoint is an error.
        """
        ids, columns = _read_checkpoint(Path(directory))
        if not np.array_equal(ids, self._ids):
            raise SampleStoreCheckpointError(
                f"{directory}: the checkpoint is over {len(ids)} sample ids that differ from this store's "
                f"{len(self._ids)}; it belongs to another training split"
            )
        for name, column in self._columns.items():
            saved = columns.get(name)
            if saved is None:
                raise SampleStoreCheckpointError(f"{directory}: column {name!r} is not in the checkpoint")
            if (saved.kind, saved.spec()) != (column.kind, column.spec()):
                raise SampleStoreCheckpointError(
                    f"{directory}: column {name!r} was saved as {saved.kind} {saved.spec()}, "
                    f"registered as {column.kind} {column.spec()}"
                )
        order = [*self._columns, *(name for name in columns if name not in self._columns)]
        self._columns = {name: columns[name] for name in order}

    @classmethod
    def from_checkpoint(
        cls, directory: str | os.PathLike[str], group: dist.ProcessGroup | None = None
    ) -> SampleStore:
        """A store with the ids and columns of a checkpoint (see ``load``)."""
        ids, columns = _read_checkpoint(Path(directory))
        store = cls(ids, group=group)
        store._columns = columns
        return store

    # -- helpers -----------------------------------------------------------------------------------------

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"column name must be a non-empty string without '.', got {name!r}")
        if name in self._columns:
            raise ValueError(f"column {name!r} is already registered")

    def _column(self, name: str) -> _Column:
        try:
            return self._columns[name]
        except KeyError:
            raise KeyError(f"no column {name!r}; registered: {list(self._columns)}") from None

    def __repr__(self) -> str:
        columns = ", ".join(f"{c.name}: {c.kind} {c.spec()}" for c in self._columns.values())
        return f"SampleStore({len(self)} samples, {self.nbytes() / 2**20:.1f} MiB; {columns})"


def _id_array(sample_ids: IdsLike, what: str) -> np.ndarray:
    if isinstance(sample_ids, Tensor):
        if sample_ids.is_floating_point() or sample_ids.is_complex() or sample_ids.dtype == torch.bool:
            raise TypeError(f"{what} must be integers, got a {sample_ids.dtype} tensor")
        array = sample_ids.detach().cpu().numpy()
    else:
        array = np.asarray(sample_ids)
        if array.size == 0:
            array = array.astype(np.int64)
        if array.dtype.kind not in "iu":
            raise TypeError(f"{what} must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _find_shards(directory: Path) -> list[_Shard]:
    if not directory.is_dir():
        raise SampleStoreCheckpointError(f"{directory}: no such checkpoint directory")
    shards = []
    for path in sorted(directory.iterdir()):
        match = SHARD_PATTERN.match(path.name)
        if match:
            shards.append(_Shard(path, int(match.group(1)), int(match.group(2))))
    if not shards:
        raise SampleStoreCheckpointError(
            f"{directory}: no sample-store shards (sample_store-<rank>-of-<world>.pt) in the directory"
        )
    worlds = sorted({s.world_size for s in shards})
    if len(worlds) > 1:
        raise SampleStoreCheckpointError(
            f"{directory}: shards of several saves (world sizes {worlds}); keep one save per directory"
        )
    world = worlds[0]
    ranks = {s.rank for s in shards}
    missing = sorted(set(range(world)) - ranks)
    extra = sorted(ranks - set(range(world)))
    if missing or extra or world < 1:
        raise SampleStoreCheckpointError(
            f"{directory}: incomplete save by {world} ranks: missing shards of ranks {missing}"
            + (f", unexpected ranks {extra}" if extra else "")
        )
    return sorted(shards, key=lambda s: s.rank)


def _read_checkpoint(directory: Path) -> tuple[np.ndarray, dict[str, _Column]]:
    """Read and cross-check every shard of one save; returns the id index and the restored columns."""
    shards = _find_shards(directory)
    ids: np.ndarray | None = None
    columns: dict[str, _Column] = {}
    reference: dict[str, Any] = {}
    for shard in shards:
        try:
            data = torch.load(shard.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise SampleStoreCheckpointError(f"{shard.path}: unreadable shard ({error})") from error
        problem = _shard_problem(data, shard)
        if problem:
            raise SampleStoreCheckpointError(f"{shard.path}: {problem}")
        layout = [(c["name"], c["kind"], c["spec"]) for c in data["columns"]]
        if ids is None:
            reference = {"num_samples": data["num_samples"], "digest": data["digest"], "layout": layout}
            ids = np.empty(data["num_samples"], dtype=np.int64)
            columns = {c["name"]: _empty_column(c, data["num_samples"]) for c in data["columns"]}
        for key in ("num_samples", "digest"):
            if data[key] != reference[key]:
                raise SampleStoreCheckpointError(
                    f"{shard.path}: {key} {data[key]} differs from rank 0's {reference[key]}: the shards "
                    "come from different saves (or the replicas had diverged)"
                )
        if layout != reference["layout"]:
            raise SampleStoreCheckpointError(f"{shard.path}: its columns differ from rank 0's shard")
        start, stop = partition(data["num_samples"], shard.rank, shard.world_size)
        if (data["start"], data["stop"]) != (start, stop) or len(data["sample_ids"]) != stop - start:
            raise SampleStoreCheckpointError(f"{shard.path}: holds rows other than [{start}, {stop})")
        ids[start:stop] = data["sample_ids"].numpy()
        for saved in data["columns"]:
            target = columns[saved["name"]].tensors
            for key, t in saved["tensors"].items():
                if key not in target or t.dtype != target[key].dtype or t.shape[1:] != target[key].shape[1:]:
                    raise SampleStoreCheckpointError(f"{shard.path}: column {saved['name']!r} is malformed")
                target[key][start:stop] = t
    assert ids is not None
    if (np.diff(ids) <= 0).any():
        raise SampleStoreCheckpointError(f"{directory}: the saved sample ids are not sorted and unique")
    if _digest(ids, columns.values()) != reference["digest"]:
        raise SampleStoreCheckpointError(
            f"{directory}: the restored store does not match the digest it was saved with (corrupt shard?)"
        )
    return ids, columns


def _shard_problem(data: Any, shard: _Shard) -> str | None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return "not a sample-store shard"
    if data.get("version") != FORMAT_VERSION:
        return f"format version {data.get('version')}, this code reads {FORMAT_VERSION}"
    if (data.get("rank"), data.get("world_size")) != (shard.rank, shard.world_size):
        return f"written as rank {data.get('rank')} of {data.get('world_size')}, named otherwise"
    return None


def _empty_column(saved: dict[str, Any], num_samples: int) -> _Column:
    spec, name = saved["spec"], saved["name"]
    if saved["kind"] == "dense":
        dtype = _DTYPES.get(spec["dtype"])
        if dtype is None:
            raise SampleStoreCheckpointError(f"column {name!r}: unknown dtype {spec['dtype']!r}")
        return _DenseColumn(
            name, torch.empty(num_samples, spec["width"], dtype=dtype), saved.get("fill", 0.0)
        )
    if saved["kind"] == "topk":
        k, num_classes = spec["k"], spec["num_classes"]
        values = torch.empty(num_samples, k, dtype=torch.float16)
        indices = torch.empty(num_samples, k, dtype=_index_dtype(num_classes))
        return _TopKColumn(name, values, indices, num_classes)
    raise SampleStoreCheckpointError(f"column {name!r}: unknown kind {saved['kind']!r}")
