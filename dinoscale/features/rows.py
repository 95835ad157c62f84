"""Feature rows as trials read them: in memory when a split is small, batch by batch when it is not.

A trial's probe input (``dinoscale.probes.registry``: ``Split``, ``BagSplit``, ``SegSplit``) holds
``RowView``s of the feature store's memory-mapped shards: one item per unit (an image, a volume's
slices, a bag), read on demand. Probes ask for tensors through ``as_batches``:

- when the view's float32 size is within its ``resident_bytes`` budget (the demo splits), it is
  loaded once and the probe gets one tensor, exactly as if the split had been an array all along;
- otherwise the probe gets a ``Batches`` reader: ``x[idx]`` / ``x.index_select(0, idx)`` read just the
  rows of a mini-batch from the store, and ``over_rows`` applies a function block by block, so a
  trial's memory is its batch and its model, not its split.

Both paths give the same numbers (element-wise ops on the same float32 values); statistics over a
streamed split (``column_stats``) are merged block by block (Chan et al.) in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

# Feature bytes (as float32) a trial may hold in memory at once; above it, splits are streamed.
DEFAULT_RESIDENT_BYTES = 1 << 30
BLOCK_BYTES = 64 << 20  # rows per block of a streamed pass (statistics, scoring): at most this many bytes


def _index(key, n: int) -> np.ndarray:
    if isinstance(key, torch.Tensor):
        key = key.cpu().numpy()
    if isinstance(key, (int, np.integer)):
        return np.array([int(key) + (n if key < 0 else 0)])
    if isinstance(key, slice):
        return np.arange(*key.indices(n))
    return np.asarray(key, dtype=np.int64).reshape(-1)


class _Items:
    """What a view of items gives besides ``__getitem__``: arrays, a dtype cast, blocks of at most
    ``max_bytes`` (of ``_block_bytes`` per item) for streamed passes."""

    _block_bytes = "nbytes"  # the attribute that sizes a block

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self, dtype=dtype)

    def blocks(self, max_bytes: int | None = None) -> Iterator[np.ndarray]:
        size = getattr(self, self._block_bytes)
        per = max(1, int(max_bytes or BLOCK_BYTES) // max(1, size // max(1, len(self))))
        for a in range(0, len(self), per):
            yield self[a : a + per]


class RowView(_Items):
    """Items of a feature set: ``index`` gives the source rows in item order; with ``group`` each item is
    ``group`` consecutive entries of ``index`` (the slices of a volume). Shape ``(n, *row)`` or
    ``(n, group, *row)``; ``view[i]`` and ``view[a:b]`` read just those items (stored dtype)."""

    def __init__(
        self,
        source,
        index: np.ndarray | None = None,
        group: int | None = None,
        resident_bytes: int = DEFAULT_RESIDENT_BYTES,
    ):
        self.source = source
        self.index = np.arange(len(source), dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self.group = group
        if group is not None and len(self.index) % group:
            raise ValueError(f"{len(self.index)} rows do not make items of {group}")
        self.resident_bytes = int(resident_bytes)
        self.row_shape = tuple(source.shape[1:])
        self.dtype = np.dtype(source.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        n = len(self.index) // (self.group or 1)
        return (n, self.group, *self.row_shape) if self.group else (n, *self.row_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def float32_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"RowView(shape={self.shape}, dtype={self.dtype})"

    def rows_of(self, items: np.ndarray) -> np.ndarray:
        if self.group is None:
            return self.index[items]
        return self.index[(items[:, None] * self.group + np.arange(self.group)).reshape(-1)]

    def __getitem__(self, key) -> np.ndarray:
        single = isinstance(key, (int, np.integer))
        items = _index(key, len(self))
        rows = self.rows_of(items)
        out = self.source.take(rows) if hasattr(self.source, "take") else np.asarray(self.source[rows])
        out = out.reshape(len(items), *self.shape[1:])
        return out[0] if single else out


class ItemView(_Items):
    """Items ``items`` of the concatenation of ``parts`` (arrays, ``RowView``s, online grids: anything with a
    shape whose ``part[idx]`` reads items), read only when asked: the train + val units of a replicate
    regrouped (``dinoscale.sweep.inputs.repartition``) without loading either split."""

    def __init__(self, parts: Sequence, items):
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])
        self.items = np.asarray(items, dtype=np.int64)
        self.shape = (len(self.items), *self.parts[0].shape[1:])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(getattr(self.parts[0], "dtype", np.float32))
        self.resident_bytes = min(getattr(p, "resident_bytes", DEFAULT_RESIDENT_BYTES) for p in self.parts)
        self._block_bytes = "float32_bytes"

    @property
    def float32_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        single = isinstance(key, (int, np.integer))
        wanted = self.items[_index(key, len(self))]
        part = np.searchsorted(self.offsets, wanted, side="right") - 1
        out = None
        for k in np.unique(part):
            at = np.flatnonzero(part == k)
            got = np.asarray(self.parts[k][wanted[at] - self.offsets[k]])
            if out is None:
                out = np.empty((len(wanted), *got.shape[1:]), dtype=got.dtype)
            out[at] = got
        if out is None:
            out = np.empty((0, *self.shape[1:]), dtype=self.dtype)
        return out[0] if single else out


def take_items(parts: Sequence, items):
    """Items of the concatenation of ``parts``: an array when every part is one, else an ``ItemView``."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)[np.asarray(items, dtype=np.int64)]
    return ItemView(parts, items)


def fits_in_memory(x) -> bool:
    """Arrays and tensors are in memory already; a view fits when its float32 size is within its budget."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return True
    if isinstance(x, (list, tuple)):
        if all(isinstance(v, (np.ndarray, torch.Tensor)) for v in x):
            return True
        return sum(_f32_bytes(v) for v in x) <= min(
            (getattr(v, "resident_bytes", DEFAULT_RESIDENT_BYTES) for v in x), default=DEFAULT_RESIDENT_BYTES
        )
    return _f32_bytes(x) <= getattr(x, "resident_bytes", 0)


def _f32_bytes(x) -> int:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return int(np.prod(x.shape, dtype=np.int64)) * 4
    return int(getattr(x, "float32_bytes", np.prod(x.shape, dtype=np.int64) * 4))


def column_stats(parts) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (float32, shape (1, d)) over the rows of an array-like or a
    list of them (bags). In memory: ``x.mean(0)`` / ``x.std(0)`` of the float32 rows, as before; streamed:
    merged block by block in float64 (Chan, Golub & LeVeque)."""
    parts = parts if isinstance(parts, (list, tuple)) else [parts]
    if fits_in_memory(list(parts)):
        a = (
            np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
            if len(parts) > 1
            else np.asarray(parts[0], np.float32)
        )
        return a.mean(0, keepdims=True), a.std(0, keepdims=True)
    n, mean, m2 = 0, None, None
    for p in parts:
        blocks = p.blocks() if hasattr(p, "blocks") else [np.asarray(p)]
        for b in blocks:
            b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
            if not len(b):
                continue
            bm, bn = b.mean(0), len(b)
            bm2 = ((b - bm) ** 2).sum(0)
            if mean is None:
                n, mean, m2 = bn, bm, bm2
                continue
            delta, tot = bm - mean, n + bn
            mean = mean + delta * bn / tot
            m2 = m2 + bm2 + delta**2 * n * bn / tot
            n = tot
    if mean is None:
        raise ValueError("no rows to standardise")
    return mean.astype(np.float32)[None], np.sqrt(m2 / n).astype(np.float32)[None]


class Batches:
    """A tensor-like reader of a streamed view: ``x[idx]`` / ``x.index_select(0, idx)`` give a tensor of the
    items ``idx`` (after ``transform`` on the float32 numpy rows); ``blocks`` iterates consecutive items."""

    def __init__(self, x, transform: Callable | None = None, dtype: torch.dtype = torch.float32):
        self.x, self.transform, self.dtype = x, transform, dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.x)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        a = np.asarray(a, dtype=np.float32) if self.dtype.is_floating_point else np.asarray(a)
        if self.transform is not None:
            a = self.transform(a)
        return torch.as_tensor(a, dtype=self.dtype)

    def __getitem__(self, key) -> torch.Tensor:
        return self._tensor(self.x[_index(key, len(self)) if not isinstance(key, slice) else key])

    def index_select(self, dim: int, index) -> torch.Tensor:
        if dim != 0:
            raise ValueError("feature rows are selected along dimension 0")
        return self[index]

    def blocks(self, max_bytes: int | None = None) -> Iterator[torch.Tensor]:
        per = max(1, int(max_bytes or BLOCK_BYTES) // max(1, _f32_bytes(self.x) // max(1, len(self))))
        for a in range(0, len(self), per):
            yield self[a : a + per]


class MappedBatches:
    """``fn`` applied to each batch a reader gives (e.g. affinity targets from label maps)."""

    def __init__(self, batches: Batches, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple | None = None):
        """``shape``: of what ``fn`` gives for the whole split, where it differs from the reader's."""
        self.batches, self.fn = batches, fn
        self.shape = tuple(shape) if shape is not None else batches.shape
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, key) -> torch.Tensor:
        return self.fn(self.batches[key])


def as_batches(x, transform: Callable | None = None, dtype: torch.dtype = torch.float32):
    """One tensor when ``x`` fits in memory (``transform`` applied to its float32 rows), else a ``Batches``
    reader that reads and transforms mini-batches on demand."""
    if not fits_in_memory(x):
        return Batches(x, transform, dtype)
    a = np.asarray(x, dtype=np.float32) if dtype.is_floating_point else np.asarray(x)
    if transform is not None:
        a = transform(a)
    return torch.as_tensor(a, dtype=dtype)


def over_rows(x, fn: Callable[[torch.Tensor], torch.Tensor], max_bytes: int | None = None) -> torch.Tensor:
    """``fn(x)`` for a tensor; for a streamed reader, ``fn`` on each block, concatenated along dimension 0."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    return torch.cat([fn(b) for b in x.blocks(max_bytes)])


class LazyList(Sequence):
    """``fn(items[i])`` computed when item ``i`` is read (standardised bags of a streamed bag split)."""

    def __init__(self, items: Sequence, fn: Callable):
        self.items, self.fn = items, fn

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.fn(v) for v in self.items[i]]
        return self.fn(self.items[i])
