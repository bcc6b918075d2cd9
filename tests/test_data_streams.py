"""OrderedStreams: coverage per dp size, exact resume across boundaries, identical stage reads."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lamemo_ds.data.manifest import load_manifest, open_tokens
from lamemo_ds.data.prepare import PrepareOptions, prepare
from lamemo_ds.data.shards import ShardError
from lamemo_ds.data.streams import OrderedStreams

pytestmark = pytest.mark.unit
N = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small files corpus of documents of varied length over several 16 KiB shards."""
    root = tmp_path_factory.mktemp("streams")
    rng = np.random.default_rng(0)
    for i in range(30):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "\n"], int(rng.integers(50, 900)))
        (root / "src").mkdir(exist_ok=True)
        (root / "src" / f"doc{i:02d}.txt").write_text(f"doc {i} " + " ".join(words))
    prepare(PrepareOptions(corpus="files", input=str(root / "src"), valid_frac=0.0,
                           test_frac=0.0, shard_bytes=16384), root / "data", workers=1,
            progress=False)
    return root / "data"


def _all(s: OrderedStreams) -> list:
    with s:
        return list(s)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_streams_cover_split_once_in_order(data_dir, dp_size):
    rows = 3
    T = open_tokens(data_dir, "train")
    per_rank = [_all(OrderedStreams(str(data_dir), "train", seg_len=N, rows=rows, dp_rank=r,
                                    dp_size=dp_size, loop=False)) for r in range(dp_size)]
    spe = len(per_rank[0])
    assert all(len(b) == spe for b in per_rank)  # no rank runs dry
    S = dp_size * rows
    L = len(T) // S
    covered = np.zeros(len(T), dtype=np.int64)
    for r, batches in enumerate(per_rank):
        for row in range(rows):
            s = r * rows + row
            inp = torch.cat([b.input[row] for b in batches]).numpy()
            tgt = torch.cat([b.target[row] for b in batches]).numpy()
            assert np.array_equal(inp, T[s * L: s * L + spe * N])  # contiguous, in order
            assert np.array_equal(tgt, T[s * L + 1: s * L + spe * N + 1])
            covered[s * L: s * L + spe * N] += 1
    assert covered.max() == 1  # exactly once
    assert covered.sum() >= len(T) - S * (N + 1)  # only each stream's short tail is dropped
    assert [b.index for b in per_rank[0]] == list(range(spe))
    assert per_rank[0][0].reset.all() and not per_rank[0][1].reset.any()


def _crossing_index(data_dir: Path, s: OrderedStreams) -> tuple[int, int]:
    """First segment index whose row 0 crosses a shard boundary, and one that crosses an EOS."""
    m = load_manifest(data_dir)
    offs = [r["token_offset"] for r in m.splits["train"]["shards"]][1:]
    T = open_tokens(data_dir, "train")
    eos = m["tokenizer"]["eos_id"]
    shard_i = doc_i = None
    for i in range(s.segments_per_epoch):
        a = i * N
        if shard_i is None and any(a < o <= a + N for o in offs):
            shard_i = i
        if doc_i is None and (T[a: a + N + 1] == eos).any():
            doc_i = i
    assert shard_i is not None and doc_i is not None
    return shard_i, doc_i


def _batches_equal(a, b) -> bool:
    return all(torch.equal(x.input, y.input) and torch.equal(x.target, y.target)
               and torch.equal(x.reset, y.reset) and (x.epoch, x.index) == (y.epoch, y.index)
               and torch.equal(x.offsets, y.offsets) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("roll", [False, True])
def test_resume_is_exact_across_shard_document_and_epoch(data_dir, roll):
    kw = dict(seg_len=N, rows=1, seed=7, random_roll=roll, prefetch=3)
    ref = OrderedStreams(str(data_dir), "train", **kw)
    spe = ref.segments_per_epoch
    shard_i, doc_i = _crossing_index(data_dir, ref)
    stops = sorted({max(shard_i - 2, 0), max(doc_i - 2, 0), spe - 2})
    k = 5
    with ref:
        full = list(itertools.islice(ref, spe + k + 3))
    for stop in stops:
        a = OrderedStreams(str(data_dir), "train", **kw)
        with a:
            list(itertools.islice(a, stop))
            state = json.loads(json.dumps(a.state_dict()))  # must be plain JSON
        b = OrderedStreams(str(data_dir), "train", **kw | {"seed": 0})
        b.load_state_dict(state)
        with b:
            assert _batches_equal(list(itertools.islice(b, k)), full[stop: stop + k]), stop
    e1 = full[spe]
    assert (e1.epoch, e1.index) == (1, 0) and e1.reset.all()
    assert torch.equal(e1.input, full[0].input) != roll  # the roll moved epoch 1's start


def test_pipeline_stages_of_one_replica_read_identical_batches(data_dir):
    kw = dict(seg_len=N, rows=2, dp_rank=1, dp_size=2, random_roll=True)
    a = OrderedStreams(str(data_dir), "train", **kw, prefetch=1)
    b = OrderedStreams(str(data_dir), "train", **kw, prefetch=4)
    n = a.segments_per_epoch + 3
    with a, b:
        assert _batches_equal(list(itertools.islice(a, n)), list(itertools.islice(b, n)))
    other = OrderedStreams(str(data_dir), "train", **kw | {"dp_rank": 0})
    with other:
        assert not torch.equal(next(other).input, next(iter(a)).input)


def test_changed_layout_resumes_with_reset_and_warning(data_dir):
    a = OrderedStreams(str(data_dir), "train", seg_len=N, rows=2)
    with a:
        list(itertools.islice(a, 10))
        state = a.state_dict()
    b = OrderedStreams(str(data_dir), "train", seg_len=N, rows=4)
    with pytest.warns(UserWarning, match="re-partitioned"):
        b.load_state_dict(state)
    with b:
        first = next(b)
    assert first.reset.all() and first.index > 0


def test_loop_false_stops_and_close_stops_thread(data_dir):
    s = OrderedStreams(str(data_dir), "train", seg_len=N, rows=2, loop=False)
    batches = list(s)
    assert len(batches) == s.segments_per_epoch
    with pytest.raises(StopIteration):
        next(s)
    s2 = OrderedStreams(str(data_dir), "train", seg_len=N, rows=2)
    next(s2)
    thread = s2._thread
    s2.close()
    assert thread is not None and not thread.is_alive()


def test_corrupted_shard_raises_on_every_rank(tmp_path, data_dir):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(data_dir, d)
    m = load_manifest(d)
    rec = m.splits["train"]["shards"][1]
    os.truncate(d / rec["url"], rec["bytes"] - 512)
    (d / "train" / "tokens.bin").unlink()
    for rank in range(2):  # each rank checks on its own: an error, never a collective hang
        with pytest.raises(ShardError, match=r"shard-000001\.tar.*prepare --verify"):
            OrderedStreams(str(d), "train", seg_len=N, rows=1, dp_rank=rank, dp_size=2)


def test_too_small_split_error_names_the_fix(data_dir):
    with pytest.raises(ValueError, match="too few"):
        OrderedStreams(str(data_dir), "train", seg_len=4096, rows=64)


def _reference_batch(s: OrderedStreams, T: np.ndarray, epoch: int, index: int) -> dict:
    """The batch at (epoch, index) by the definition, one token at a time (slow, plainly right)."""
    S, L, R = s.num_streams, s.stream_len, s.rows
    rolls = s.rolls(epoch)
    rows = range(s.dp_rank * R, (s.dp_rank + 1) * R)
    pos = [[g * L + (index * N + rolls[g] + j) % L for j in range(N + 1)] for g in rows]
    win = np.array([[int(T[p]) for p in row] for row in pos], dtype=np.int64)  # [R, N+1]
    assert len(rolls) == S
    return {"input": win[:, :-1], "target": win[:, 1:], "offsets": np.array([p[0] for p in pos]),
            "reset": np.full(R, index == 0), "wraps": any(p[-1] < p[0] for p in pos)}


@pytest.mark.parametrize("roll", [False, True])
def test_make_batch_matches_the_definition_including_wrapped_rows(data_dir, roll):
    s = OrderedStreams(str(data_dir), "train", seg_len=N, rows=2, dp_rank=1, dp_size=2, seed=3,
                       random_roll=roll)
    T = open_tokens(data_dir, "train")
    wrapped = 0
    for epoch in (0, 1):
        for index in range(s.segments_per_epoch):
            b, ref = s.make_batch(epoch, index), _reference_batch(s, T, epoch, index)
            assert (b.epoch, b.index) == (epoch, index)
            assert b.input.dtype == b.target.dtype == b.offsets.dtype == torch.int64
            for key in ("input", "target", "offsets", "reset"):
                assert np.array_equal(getattr(b, key).numpy(), ref[key]), (epoch, index, key)
            wrapped += ref["wraps"]
    assert (wrapped > 0) == roll  # the rolled path really read across a stream's end
    with pytest.raises(ValueError, match="outside epoch"):
        s.make_batch(0, s.segments_per_epoch)


def _chunk_for(spe: int) -> int:
    """A chunk size that does not divide the epoch, so a short chunk ends it."""
    return next(k for k in (5, 7, 11) if spe % k)


@pytest.mark.parametrize(("roll", "loop"), [(False, True), (True, True), (False, False),
                                            (True, False)])
def test_chunked_prefetch_equals_make_batch_across_epochs(data_dir, roll, loop):
    kw = dict(seg_len=N, rows=3, seed=5, random_roll=roll, loop=loop, prefetch=2)
    spe = OrderedStreams(str(data_dir), "train", **kw).segments_per_epoch
    chunk = _chunk_for(spe)
    s = OrderedStreams(str(data_dir), "train", **kw, chunk=chunk)
    n = spe + 3 * chunk + 1 if loop else spe + 5
    with s:
        got = list(itertools.islice(s, n))
    assert len(got) == (n if loop else spe) and n > 2 * chunk
    want = [s.make_batch(e, i) for e, i in itertools.islice(
        ((e, i) for e in itertools.count() for i in range(spe)), len(got))]
    assert _batches_equal(got, want)
    if loop:  # epoch 1 starts with a reset, and the roll (only) moves its tokens
        assert got[spe].reset.all() and not got[spe + 1].reset.any()
        assert torch.equal(got[spe].input, got[0].input) != roll


@pytest.mark.parametrize("roll", [False, True])
def test_resume_mid_chunk_continues_identically(data_dir, roll):
    kw = dict(seg_len=N, rows=3, seed=9, random_roll=roll, prefetch=4)
    spe = OrderedStreams(str(data_dir), "train", **kw).segments_per_epoch
    chunk = _chunk_for(spe)
    with OrderedStreams(str(data_dir), "train", **kw, chunk=chunk) as ref:
        full = list(itertools.islice(ref, spe + 3 * chunk + 3))
    for stop in (chunk + 2, spe - 1, spe + chunk + 1):  # inside a chunk, last of epoch, epoch 1
        with OrderedStreams(str(data_dir), "train", **kw, chunk=chunk) as a:
            list(itertools.islice(a, stop))
            state = json.loads(json.dumps(a.state_dict()))
        assert (state["epoch"], state["index"]) == divmod(stop, spe)  # not where the thread is
        b = OrderedStreams(str(data_dir), "train", **kw, chunk=3)  # other chunking, same batches
        b.load_state_dict(state)
        with b:
            assert _batches_equal(list(itertools.islice(b, chunk + 2)),
                                  full[stop: stop + chunk + 2]), stop


def test_forced_reset_marks_only_the_first_batch_after_resume(data_dir):
    a = OrderedStreams(str(data_dir), "train", seg_len=N, rows=2, chunk=4)
    with a:
        list(itertools.islice(a, 6))
        state = a.state_dict()
    b = OrderedStreams(str(data_dir), "train", seg_len=N, rows=4, chunk=4)
    with pytest.warns(UserWarning, match="re-partitioned"):
        b.load_state_dict(state)
    e, i = b.state_dict()["epoch"], b.state_dict()["index"]
    with b:
        got = list(itertools.islice(b, 6))
    assert i > 0 and _batches_equal(got[:1], [b.make_batch(e, i, reset=True)])
    assert _batches_equal(got[1:], [b.make_batch(e, i + k) for k in range(1, 6)])
    assert got[0].reset.all() and not any(g.reset.any() for g in got[1:])
