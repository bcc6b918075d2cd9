"""Ordered streams: a split as S = dp_size x rows contiguous token streams (DESIGN.md "Data").

The split is one token sequence T (documents separated by EOS). Global stream s owns the
contiguous slice [s*L, (s+1)*L), L = len(T) // S, and yields it segment after segment, so a
stream's memory always continues its own text. Every stream yields the same number of segments,
so no rank runs dry. A batch is a pure function of (epoch, index): that makes state_dict tiny
and resume exact, and lets a background thread prefetch without any reordering.

Speed: the thread reads a `Chunk` of K consecutive segments with one int64 copy (one strided
cast, or one slice per row when rolled) and the consumer splits it into K `Batch`es of views,
so the per-batch Python is a few C calls; a chunk ends at the epoch's end.

Shapes: R = rows (streams of this rank), N = seg_len.
"""

from __future__ import annotations

import collections
import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .manifest import load_manifest, open_tokens

STATE_VERSION = 1
CHUNK_BYTES = 4 << 20  # int64 window bytes per prefetch hand-off (sets the default chunk)
MAX_CHUNK = 64  # batches per hand-off at most (tiny batches)


@dataclass
class Batch:
    """One segment of each of this rank's streams."""

    input: torch.Tensor  # [R, N] int64
    target: torch.Tensor  # [R, N] int64: input shifted by one token
    reset: torch.Tensor  # [R] bool: clear memory before this segment
    epoch: int
    index: int  # segment index within the epoch (same for every row)
    offsets: torch.Tensor  # [R] int64: split position of input[:, 0]


@dataclass
class Chunk:
    """K consecutive batches as three arrays: what the prefetch thread hands over.

    Batch k is segment index+k of every row: tokens [k*N, (k+1)*N] of the window, which holds
    K*N+1 consecutive tokens of each row. One copy of the window serves the whole chunk and the
    batch tensors are views of it, because a copy per batch costs more Python than reading the
    tokens does. Every batch keeps the whole window's storage alive.
    """

    epoch: int
    index: int  # segment index of batch 0
    seg_len: int  # N
    window: np.ndarray  # [R, K*N+1] int64
    flags: np.ndarray  # [K, R] bool: reset
    offsets: np.ndarray  # [K, R] int64: split position of each batch's input[:, 0]

    def batches(self) -> list[Batch]:
        """The K `Batch`es, as views (a few C calls for the whole chunk)."""
        (K, R), N, W = self.flags.shape, self.seg_len, self.window.shape[1]
        window = torch.from_numpy(self.window)  # [R, W]
        inputs = window.as_strided((K, R, N), (N, W, 1)).unbind(0)  # K x [R, N]
        targets = window.as_strided((K, R, N), (N, W, 1), 1).unbind(0)  # K x [R, N]
        resets = torch.from_numpy(self.flags).unbind(0)  # K x [R]
        offsets = torch.from_numpy(self.offsets).unbind(0)  # K x [R]
        e, i0 = self.epoch, self.index
        return [Batch(x, y, f, e, i, o) for i, x, y, f, o in
                zip(range(i0, i0 + K), inputs, targets, resets, offsets, strict=True)]


class OrderedStreams:
    """Iterator of `Batch`es over one split; see the module docstring.

    Args:
        data_dir: folder written by `lamemo prepare`.
        split: split name ("train", "valid", "test").
        seg_len: tokens per segment N.
        rows: streams of this data-parallel rank (the per-rank batch size).
        dp_rank: data-parallel rank (pipeline stages of one replica pass the same value, so they
            read identical batches; never the global RANK).
        dp_size: data-parallel world size.
        seed: seed of the per-epoch random roll.
        random_roll: from epoch 1 on, roll every stream by a random offset (reference training).
        prefetch: batches the background thread keeps prepared ahead, at least (it works in
            whole chunks, so up to about prefetch + 2 chunks are held).
        chunk: batches built with one copy and handed over together (default: a ~4 MiB int64
            window, at most 64). Bigger amortises the per-batch Python and thread hand-off.
        loop: True: epochs forever; False: one pass (evaluation), then StopIteration.
        verify: check the token file's sha256 on open (cheap next to a training run).
    """

    def __init__(self, data_dir: str, split: str, *, seg_len: int, rows: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, random_roll: bool = False, prefetch: int = 4,
                 loop: bool = True, verify: bool = True, chunk: int | None = None):
        if chunk is None:
            chunk = max(1, min(MAX_CHUNK, CHUNK_BYTES // (8 * rows * (seg_len + 1))))
        if min(seg_len, rows, dp_size, prefetch, chunk) < 1:
            raise ValueError(f"seg_len={seg_len}, rows={rows}, dp_size={dp_size}, "
                             f"prefetch={prefetch}, chunk={chunk}: all must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
        self.data_dir, self.split = str(data_dir), split
        self.seg_len, self.rows, self.dp_rank, self.dp_size = seg_len, rows, dp_rank, dp_size
        self.seed, self.random_roll, self.prefetch, self.loop = seed, random_roll, prefetch, loop
        self.chunk = chunk
        self.manifest = load_manifest(data_dir)
        self.tokens = open_tokens(data_dir, split, verify_sha=verify)  # [T]
        self.num_streams = dp_size * rows
        self.stream_len = len(self.tokens) // self.num_streams
        self.segments_per_epoch = (self.stream_len - 1) // seg_len
        if self.segments_per_epoch < 1:
            raise ValueError(
                f"{data_dir}/{split} has {len(self.tokens):,} tokens: too few for "
                f"{self.num_streams} streams (dp_size {dp_size} x rows {rows}) of at least "
                f"seg_len+1={seg_len + 1} tokens each; use fewer rows or a shorter seg_len")
        self._flat = self.tokens.view(np.ndarray)  # plain ndarray: slicing a memmap is slow
        self._row_base = (dp_rank * rows + np.arange(rows, dtype=np.int64)) * self.stream_len
        self._roll_cache: tuple[int, np.ndarray | None] = (-1, None)
        self._epoch, self._index, self._force_reset = 0, 0, False
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._ready: collections.deque = collections.deque()

    # ----------------------------------------------------------------- batch construction
    def rolls(self, epoch: int) -> np.ndarray:
        """Roll offset of every global stream in `epoch` ([S] int64; zeros without random_roll).

        Drawn from a generator seeded by (seed, epoch), identical on every rank and after resume.
        """
        if not self.random_roll or epoch == 0:
            return np.zeros(self.num_streams, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.integers(0, self.stream_len, size=self.num_streams, dtype=np.int64)

    def cursors(self, epoch: int, index: int) -> np.ndarray:
        """Split position of the next input token of every global stream ([S] int64)."""
        base = np.arange(self.num_streams, dtype=np.int64) * self.stream_len
        return base + (index * self.seg_len + self.rolls(epoch)) % self.stream_len

    def make_batch(self, epoch: int, index: int, *, reset: bool = False) -> Batch:
        """The batch at (epoch, index) for this rank: a pure function of its arguments.

        The iterator builds its batches with the same `read_chunk` + `Chunk.batches`, K at a
        time, and the window of K segments holds each one's tokens at the same place, so what it
        yields equals this function batch for batch.
        """
        return self.read_chunk(epoch, index, count=1, reset=reset).batches()[0]

    def read_chunk(self, epoch: int, index: int, *, count: int, reset: bool = False) -> Chunk:
        """Segments index..index+count-1 of `epoch` for this rank, with one int64 copy.

        The prefetch thread runs this (the copy releases the GIL); the consumer runs the cheap
        `Chunk.batches()`. `count` may not cross the epoch's end: the next epoch has new rolls.
        """
        R, N, L = self.rows, self.seg_len, self.stream_len
        epoch, index = int(epoch), int(index)  # numpy integers would take the rolled path
        if count < 1 or not 0 <= index <= self.segments_per_epoch - count:
            raise ValueError(f"segments [{index}, {index + count}) outside epoch of "
                             f"{self.segments_per_epoch} segments (count must be >= 1)")
        roll = self._rank_rolls(epoch)  # [R] or None
        start = index * N if roll is None else (index * N + roll) % L  # int or [R]
        window = self._window(start, count * N + 1)  # [R, K*N+1] int64, the only copy
        offs = self._row_base + (start + N * np.arange(count, dtype=np.int64)[:, None]) % L
        flags = np.zeros((count, R), dtype=np.bool_)  # [K, R]
        flags[0] = reset or index == 0
        return Chunk(epoch, index, N, window, flags, offs)

    def _window(self, start: np.ndarray | int, width: int) -> np.ndarray:
        """Tokens [start, start+width) of each of this rank's rows, as int64 ([R, width]).

        `start` is one position shared by all rows (never wraps: one strided view, one cast)
        or one per row (rolled): then one gather of every row's window and one cast, after which
        the few rows that wrap round their stream's end are rewritten in two pieces. Few numpy
        calls per chunk matter: each one hands the GIL back and forth with the consumer.
        """
        R, L, flat = self.rows, self.stream_len, self._flat
        isz, first = flat.itemsize, int(self._row_base[0])
        if isinstance(start, int):
            view = np.ndarray((R, width), dtype=flat.dtype, buffer=flat,
                              offset=(first + start) * isz,
                              strides=(L * isz, isz))  # [R, width], no copy
            return view.astype(np.int64)
        windows = np.lib.stride_tricks.as_strided(
            flat[first:], shape=(R, L - width + 1, width), strides=(L * isz, isz, isz),
            writeable=False)  # [R, L-width+1, width]: every window of every row, no copy
        out = windows[np.arange(R), np.minimum(start, L - width)].astype(np.int64)  # [R, width]
        for r in np.flatnonzero(start > L - width).tolist():  # width <= L: wraps at most once
            base, s = first + r * L, int(start[r])
            head = L - s
            out[r, :head] = flat[base + s:base + L]
            out[r, head:] = flat[base:base + width - head]
        return out

    def _rank_rolls(self, epoch: int) -> np.ndarray | None:
        """This rank's rows of `rolls(epoch)` (None when all zero: the fast strided path)."""
        if self._roll_cache[0] != epoch:
            first = self.dp_rank * self.rows
            r = self.rolls(epoch)[first:first + self.rows]
            self._roll_cache = (epoch, r if r.any() else None)
        return self._roll_cache[1]

    def _successor(self, epoch: int, index: int) -> tuple[int, int]:
        return (epoch, index + 1) if index + 1 < self.segments_per_epoch else (epoch + 1, 0)

    # ----------------------------------------------------------------- iteration + prefetch
    def __iter__(self) -> OrderedStreams:
        return self

    def __len__(self) -> int:
        return self.segments_per_epoch

    def __next__(self) -> Batch:
        # the hot path: pop a prefetched batch; the thread never builds one past the end
        if not self._ready:
            self._refill()
        item = self._ready.popleft()
        assert (item.epoch, item.index) == (self._epoch, self._index), "prefetch out of order"
        self._epoch, self._index = self._successor(item.epoch, item.index)
        self._force_reset = False
        return item

    def _refill(self) -> None:
        """Wait for the next chunk (starting the thread first); StopIteration past the end."""
        if self._done(self._epoch, self._index):
            raise StopIteration
        if self._thread is None:
            self._start()
        got = self._queue.get()
        if isinstance(got, BaseException):
            self._thread = None
            raise got
        self._ready.extend(got.batches())

    def _done(self, epoch: int, index: int) -> bool:
        return not self.loop and epoch >= 1

    def _start(self) -> None:
        self._stop = threading.Event()
        self._ready = collections.deque()
        self._queue = queue.Queue(maxsize=max(1, -(-self.prefetch // self.chunk)))
        args = (self._epoch, self._index, self._force_reset, self._stop, self._queue)
        self._thread = threading.Thread(target=self._produce, args=args, daemon=True,
                                        name=f"OrderedStreams-{self.split}")
        self._thread.start()

    def _produce(self, epoch: int, index: int, reset: bool, stop: threading.Event,
                 q: queue.Queue) -> None:
        """Build chunks from (epoch, index) on; a chunk never crosses an epoch boundary."""
        try:
            while not stop.is_set() and not self._done(epoch, index):
                count = min(self.chunk, self.segments_per_epoch - index)
                item = self.read_chunk(epoch, index, count=count, reset=reset)
                reset = False
                epoch, index = self._successor(epoch, index + count - 1)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, never lost in the thread
            q.put(e)

    def close(self) -> None:
        """Stop the prefetch thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread, self._queue, self._ready = None, None, collections.deque()

    def __enter__(self) -> OrderedStreams:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when __init__ raised
        if stop is not None:
            stop.set()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything resume needs, as plain JSON-able values (position of the NEXT batch)."""
        e, i = self._epoch, self._index
        return {
            "version": STATE_VERSION, "split": self.split, "epoch": e, "index": i,
            "seg_len": self.seg_len, "dp_size": self.dp_size, "rows": self.rows,
            "num_streams": self.num_streams, "split_tokens": int(len(self.tokens)),
            "tokenizer_id": self.manifest.tokenizer["id"], "force_reset": self._force_reset,
            "rng": {"kind": "numpy.default_rng([seed, epoch])", "seed": self.seed,
                    "random_roll": self.random_roll},
            "cursors": self.cursors(e, i).tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume so the next batch is the one an uninterrupted loader would yield next.

        A different stream layout (dp_size x rows or seg_len) cannot continue the same streams:
        the position is carried over proportionally, memory is reset, and a warning says so.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')} != {STATE_VERSION}")
        if state["split_tokens"] != len(self.tokens) or \
                state["tokenizer_id"] != self.manifest.tokenizer["id"]:
            raise ValueError(
                f"stream state was saved on other data ({state['split_tokens']:,} tokens, "
                f"tokenizer {state['tokenizer_id'][:12]}) than {self.data_dir}/{self.split} "
                f"({len(self.tokens):,} tokens, tokenizer {self.manifest.tokenizer['id'][:12]})")
        self.close()
        self.seed = state["rng"]["seed"]
        self.random_roll = state["rng"]["random_roll"]
        same = (state["num_streams"], state["seg_len"]) == (self.num_streams, self.seg_len)
        if same:
            self._epoch, self._index = state["epoch"], state["index"]
            self._force_reset = bool(state.get("force_reset", False))
            return
        old_spe = (state["split_tokens"] // state["num_streams"] - 1) // state["seg_len"]
        frac = state["index"] / max(old_spe, 1)
        self._epoch = state["epoch"]
        self._index = min(int(frac * self.segments_per_epoch), self.segments_per_epoch - 1)
        self._force_reset = True
        warnings.warn(
            f"stream layout changed ({state['num_streams']} streams x N={state['seg_len']} -> "
            f"{self.num_streams} x N={self.seg_len}): streams re-partitioned at epoch "
            f"{self._epoch} segment {self._index}, memory reset", stacklevel=2)
