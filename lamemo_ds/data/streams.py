"""Ordered streams: a split as S = dp_size x rows contiguous token streams (DESIGN.md "Data").

The split is one token sequence T (documents separated by EOS). Global stream s owns the
contiguous slice [s*L, (s+1)*L), L = len(T) // S, and yields it segment after segment, so a
stream's memory always continues its own text. Every stream yields the same number of segments,
so no rank runs dry. A batch is a pure function of (epoch, index): that makes state_dict tiny
and resume exact, and lets a background thread prefetch without any reordering.

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
CHUNK = 8  # batches handed over per queue item: amortises the thread hand-off


@dataclass
class Batch:
    """One segment of each of this rank's streams."""

    input: torch.Tensor  # [R, N] int64
    target: torch.Tensor  # [R, N] int64: input shifted by one token
    reset: torch.Tensor  # [R] bool: clear memory before this segment
    epoch: int
    index: int  # segment index within the epoch (same for every row)
    offsets: torch.Tensor  # [R] int64: split position of input[:, 0]


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
        prefetch: batches prepared ahead by the background thread.
        loop: True: epochs forever; False: one pass (evaluation), then StopIteration.
        verify: check the token file's sha256 on open (cheap next to a training run).
    """

    def __init__(self, data_dir: str, split: str, *, seg_len: int, rows: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, random_roll: bool = False, prefetch: int = 4,
                 loop: bool = True, verify: bool = True):
        if seg_len < 1 or rows < 1 or dp_size < 1 or prefetch < 1:
            raise ValueError(f"seg_len={seg_len}, rows={rows}, dp_size={dp_size}, "
                             f"prefetch={prefetch}: all must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
        self.data_dir, self.split = str(data_dir), split
        self.seg_len, self.rows, self.dp_rank, self.dp_size = seg_len, rows, dp_rank, dp_size
        self.seed, self.random_roll, self.prefetch, self.loop = seed, random_roll, prefetch, loop
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
        self._steps = np.arange(seg_len + 1, dtype=np.int64)
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
        """The batch at (epoch, index) for this rank: a pure function of its arguments."""
        R, N, L = self.rows, self.seg_len, self.stream_len
        first = self.dp_rank * R
        roll = self._rank_rolls(epoch)  # [R]
        if roll is None:
            start = first * L + index * N
            isz = self._flat.itemsize
            view = np.ndarray((R, N + 1), dtype=self._flat.dtype, buffer=self._flat,
                              offset=start * isz, strides=(L * isz, isz))  # [R, N+1], no copy
            offs = self._row_base + index * N
        else:
            pos = (index * N + roll[:, None] + self._steps) % L  # [R, N+1]
            view = self._flat[self._row_base[:, None] + pos]  # [R, N+1]
            offs = self._row_base + pos[:, 0]
        window = torch.from_numpy(view.astype(np.int64))  # [R, N+1], the only copy
        flags = np.full(R, reset or index == 0, dtype=np.bool_)
        # input and target are overlapping views of one buffer (row stride N+1)
        return Batch(input=window[:, :-1], target=window[:, 1:], reset=torch.from_numpy(flags),
                     epoch=epoch, index=index, offsets=torch.from_numpy(offs))

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
        if self._done(self._epoch, self._index):
            raise StopIteration
        if self._thread is None:
            self._start()
        if not self._ready:
            got = self._queue.get()
            if isinstance(got, BaseException):
                self._thread = None
                raise got
            self._ready.extend(got)
        item = self._ready.popleft()
        assert (item.epoch, item.index) == (self._epoch, self._index), "prefetch out of order"
        self._epoch, self._index = self._successor(item.epoch, item.index)
        self._force_reset = False
        return item

    def _done(self, epoch: int, index: int) -> bool:
        return not self.loop and epoch >= 1

    def _start(self) -> None:
        self._stop = threading.Event()
        self._ready = collections.deque()
        self._queue = queue.Queue(maxsize=max(1, -(-self.prefetch // CHUNK)))
        args = (self._epoch, self._index, self._force_reset, self._stop, self._queue)
        self._thread = threading.Thread(target=self._produce, args=args, daemon=True,
                                        name=f"OrderedStreams-{self.split}")
        self._thread.start()

    def _produce(self, epoch: int, index: int, reset: bool, stop: threading.Event,
                 q: queue.Queue) -> None:
        try:
            while not stop.is_set() and not self._done(epoch, index):
                item = []
                while len(item) < min(CHUNK, self.prefetch) and not self._done(epoch, index):
                    item.append(self.make_batch(epoch, index, reset=reset))
                    reset = False
                    epoch, index = self._successor(epoch, index)
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
