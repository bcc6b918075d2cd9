"""`lamemo prepare --corpus recall`: seeded, every key recalled exactly `gap` tokens after its
first copy, the knobs that cannot work refused before anything is written, and the scorer marks
exactly the recall key symbols."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lamemo_ds.data.corpora import CorpusError
from lamemo_ds.data.manifest import load_manifest, open_tokens
from lamemo_ds.data.recall import RECALL, RecallScorer, RecallSpec, recall_scorer
from lamemo_ds.data.streams import OrderedStreams

pytestmark = pytest.mark.unit
EPISODE = re.compile(r"#(\w+)\n(\.*)\?(\w+)\n")


def prepare(lamemo, out, *extra: str):
    return lamemo("prepare", "--corpus", "recall", "--out", str(out), "--quiet",
                  "--split-sizes", "20000,4000,4000", *extra)


def text_of(folder, split: str) -> str:
    toks = np.asarray(open_tokens(folder, split))
    return bytes(toks[toks < 256].astype(np.uint8)).decode()


def test_keys_are_recalled_gap_tokens_later_and_seeded(tmp_path, lamemo):
    r = prepare(lamemo, tmp_path / "a", "--recall-gap", "20-30", "--recall-key-len", "4",
                "--recall-alphabet", "wxyz")
    assert r.returncode == 0, r.stderr
    text = text_of(tmp_path / "a", "train")
    episodes = EPISODE.findall(text)
    assert len(episodes) > 100
    gaps = set()
    for key, filler, again in episodes:
        assert key == again and len(key) == 4 and set(key) <= set("wxyz")
        gaps.add(len(key) + 2 + len(filler))  # distance between a symbol's two copies
    assert min(gaps) >= 20 and max(gaps) <= 30 and len(gaps) > 5
    m = load_manifest(tmp_path / "a")
    assert m["recall"]["gap_min"] == 20 and m["recall"]["alphabet"] == "wxyz"
    # the same options write the same tokens; another seed or split other keys
    assert prepare(lamemo, tmp_path / "b", "--recall-gap", "20-30", "--recall-key-len", "4",
                   "--recall-alphabet", "wxyz").returncode == 0
    assert text_of(tmp_path / "b", "train") == text
    assert prepare(lamemo, tmp_path / "c", "--recall-gap", "20-30", "--recall-key-len", "4",
                   "--recall-alphabet", "wxyz", "--recall-seed", "5").returncode == 0
    assert text_of(tmp_path / "c", "train") != text
    assert EPISODE.findall(text_of(tmp_path / "a", "valid"))[:5] != episodes[:5]


@pytest.mark.parametrize("flags, says", [
    (("--recall-gap", "0"), "--recall-gap 0"),
    (("--recall-gap", "7"), "gap >= 8"),
    (("--recall-gap", "40-30"), "range is empty"),
    (("--recall-gap", "many"), "--recall-gap 'many'"),
    (("--recall-alphabet", ""), "at least 2 distinct"),
    (("--recall-alphabet", "aab"), "repeats a symbol"),
    (("--recall-alphabet", "ab?"), "markers"),
    (("--recall-alphabet", "ab."), "'.'"),
    (("--recall-filler", ""), "--recall-filler is empty"),
    (("--recall-alphabet", "αβγ"), "ASCII"),
    (("--recall-key-len", "0"), "--recall-key-len 0"),
    (("--recall-episodes", "0"), "--recall-episodes 0"),
    (("--recall-spacing", "-1"), "--recall-spacing -1"),
    (("--tokenizer", "word"), "one token per character"),
    (("--recall-pairs", "0"), "--recall-pairs 0"),
    (("--recall-pairs", "4", "--recall-names", "ABC"), "needs 4 distinct"),
    (("--recall-pairs", "2", "--recall-names", "AA"), "needs 2 distinct"),
    (("--recall-pairs", "2", "--recall-names", "A1"), "uses ['1']"),
    (("--recall-pairs", "2", "--recall-filler", "x=y"), "uses ['=']"),
    (("--recall-pairs", "4", "--recall-names", "ABCDEFG", "--recall-fresh-names"),
     "need 8 distinct names"),
    (("--recall-pairs", "4", "--recall-key-len", "2", "--recall-gap", "10-34"), ">= 35"),
    (("--recall-pairs", "4", "--recall-key-len", "2", "--recall-gap", "40-60"),
     "HI - LO >= 30"),
])
def test_knobs_that_cannot_work_are_refused_before_writing(tmp_path, lamemo, flags, says):
    r = prepare(lamemo, tmp_path / "out", *flags)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_char_tokenizer_allows_other_alphabets(tmp_path, lamemo):
    r = prepare(lamemo, tmp_path / "c", "--tokenizer", "char", "--recall-alphabet", "αβγδ",
                "--recall-gap", "12")
    assert r.returncode == 0, r.stderr
    scorer = RecallScorer(str(tmp_path / "c"), "valid")
    assert scorer.mask.sum() > 0 and scorer.spec.bits_per_symbol == pytest.approx(2.0)


def test_generator_marks_the_key_after_each_recall_marker():
    """Single-key episodes: the generator's own positions are the key_len symbols after `?`."""
    spec = RecallSpec(gap_min=12, gap_max=20, key_len=3, alphabet="abc")
    text = "".join(text + "\0" for text, _ in spec._texts("valid", 3000))  # \0: the EOS
    mask = spec.scored("valid", 3000)
    marks = [m.start() for m in re.finditer(re.escape(RECALL), text)]
    want = sorted(m + j for m in marks for j in range(1, 4))
    assert len(marks) > 10 and np.flatnonzero(mask).tolist() == want
    assert len(mask) == len(text)


def test_scorer_selects_recall_targets_of_stream_batches(tmp_path, lamemo):
    assert prepare(lamemo, tmp_path / "r", "--recall-gap", "16").returncode == 0
    scorer = recall_scorer(str(tmp_path / "r"), "valid")
    marker = ord(RECALL)
    spec = RecallSpec(gap_min=16, gap_max=16)
    loader = OrderedStreams(str(tmp_path / "r"), "valid", seg_len=8, rows=3, loop=False)
    seen = 0
    for b in loader:
        mask = scorer(b)
        assert mask.shape == b.target.shape
        # a target is a key symbol iff a recall marker stands 1..key_len inputs before it
        seq = np.concatenate([b.input.numpy(), b.target[:, -1:].numpy()], 1)
        for r in range(3):
            for j in range(8):
                back = [seq[r, j + 1 - k] for k in range(1, spec.key_len + 1) if j + 1 - k >= 0]
                if len(back) == spec.key_len:
                    assert bool(mask[r, j]) == (marker in back), (r, j)
        seen += int(mask.sum())
    loader.close()
    assert seen > 0
    assert recall_scorer(str(tmp_path / "r"), "valid") is not None


def test_other_corpora_have_no_scorer(corpus):
    assert recall_scorer(str(corpus), "valid") is None
    with pytest.raises(CorpusError, match="not prepared with --corpus recall"):
        RecallScorer(str(corpus), "valid")


MULTI = ("--recall-pairs", "4", "--recall-key-len", "2", "--recall-alphabet", "01234567",
         "--recall-gap", "32-64", "--recall-filler", "so it goes ", "--recall-spacing", "8")
LINE = re.compile(r"([A-Z])=([0-7]{2})\n")


def episodes_of(text: str, pairs: int):
    """[(write lines, query lines with their text offsets)] per episode of a multi-query text."""
    lines = [(m.start(), m.group(1), m.group(2)) for m in LINE.finditer(text)]
    assert len(lines) % (2 * pairs) == 0
    return [(lines[i:i + pairs], lines[i + pairs:i + 2 * pairs])
            for i in range(0, len(lines), 2 * pairs)]


def test_multi_query_pairs_pending_random_order_gap_in_range(tmp_path, lamemo):
    r = prepare(lamemo, tmp_path / "m", *MULTI)
    assert r.returncode == 0, r.stderr
    text = text_of(tmp_path / "m", "valid")
    assert "#" not in text and "?" not in text  # no project markers: key=value among words
    orders, gaps = set(), []
    for writes, queries in episodes_of(text, 4):
        # four keys pending at once: all written (distinct names) before any is asked for
        assert len({n for _, n, _ in writes}) == 4 and writes[-1][0] < queries[0][0]
        assert {(n, v) for _, n, v in writes} == {(n, v) for _, n, v in queries}
        first = {n: at for at, n, _ in writes}
        gaps += [at - first[n] for at, n, _ in queries]
        orders.add(tuple(n for _, n, _ in queries) == tuple(n for _, n, _ in writes))
    assert orders == {True, False}  # queries in random order, sometimes the written one
    assert min(gaps) >= 32 and max(gaps) <= 64 and len(set(gaps)) > 20
    # the scorer marks exactly the value symbols of the queries
    mask = RecallScorer(str(tmp_path / "m"), "valid").mask
    toks = np.asarray(open_tokens(tmp_path / "m", "valid"))
    want = [at + 2 + j for _, queries in episodes_of(text_of(tmp_path / "m", "valid"), 4)
            for at, _, _ in queries for j in range(2)]
    body = np.flatnonzero(toks < 256)  # the text's token positions (EOS left out)
    assert body[want].tolist() == np.flatnonzero(mask).tolist()


def test_multi_query_is_seeded_and_old_recipes_unchanged(tmp_path, lamemo):
    assert prepare(lamemo, tmp_path / "a", *MULTI).returncode == 0
    assert prepare(lamemo, tmp_path / "b", *MULTI).returncode == 0
    assert prepare(lamemo, tmp_path / "c", *MULTI, "--recall-seed", "3").returncode == 0
    a = text_of(tmp_path / "a", "train")
    assert a == text_of(tmp_path / "b", "train") != text_of(tmp_path / "c", "train")
    assert load_manifest(tmp_path / "a")["recall"]["pairs"] == 4
    assert "fresh_names" not in load_manifest(tmp_path / "a")["options"]["recall"]  # as before
    # single-key recipes keep their manifest keys (and so their folders) as before
    assert prepare(lamemo, tmp_path / "s").returncode == 0
    assert "pairs" not in load_manifest(tmp_path / "s")["options"]["recall"]


def test_fresh_names_keep_neighbouring_episodes_apart(tmp_path, lamemo):
    """--recall-fresh-names: no episode reuses a name of the episode before it in its document
    (without it about 4/26 of the names do), and the manifest says so."""
    shared = {}
    for tag, extra in (("plain", ()), ("fresh", ("--recall-fresh-names",))):
        assert prepare(lamemo, tmp_path / tag, *MULTI, *extra).returncode == 0
        toks = np.asarray(open_tokens(tmp_path / tag, "train"))
        docs = bytes(np.where(toks < 256, toks, ord("|")).astype(np.uint8)).decode().split("|")
        pairs = reused = 0
        for doc in filter(None, docs):
            names = [{n for _, n, _ in writes} for writes, _ in episodes_of(doc, 4)]
            pairs += 4 * (len(names) - 1)
            reused += sum(len(a & b) for a, b in zip(names, names[1:]))
        assert pairs > 200
        shared[tag] = reused / pairs
    assert shared["fresh"] == 0 and shared["plain"] > 0.08
    assert load_manifest(tmp_path / "fresh")["recall"]["fresh_names"] is True


def test_elimination_reader_pays_for_what_the_pending_values_leave_open():
    """Values asked in order 12, 13, 45: the reader holding {12, 13, 45} pays log2(3/2) for
    the first '1', then 1 bit for '2' (12 or 13), 1 bit for the second query's '1' (13 or 45)
    and nothing after that."""
    spec = RecallSpec(pairs=3, key_len=2, alphabet="12345", gap_min=40, gap_max=80)
    got = spec._elimination("12 13 45", [0, 1, 3, 4, 6, 7])
    assert got == pytest.approx([np.log2(1.5), 1.0, 1.0, 0.0, 0.0, 0.0])


def test_targets_label_query_order_and_symbol(tmp_path, lamemo):
    assert prepare(lamemo, tmp_path / "m", *MULTI).returncode == 0
    scorer = RecallScorer(str(tmp_path / "m"), "valid")
    labels, elim = scorer.labels, scorer.elimination
    assert (scorer.mask == (labels >= 0)).all() and set(np.unique(labels)) == {-1, *range(8)}
    assert scorer.spec.group_names() == [f"q{q} s{j}" for q in range(1, 5) for j in (1, 2)]
    assert np.isnan(elim[labels < 0]).all() and (elim[labels >= 0] >= 0).all()
    assert (elim[labels == 6] == 0).all() and (elim[labels == 7] == 0).all()  # last query
    assert (elim[labels == 0] <= 2.0).all() and elim[labels == 0].mean() > 1.0
    total, groups = scorer.elimination_bits()
    assert total == pytest.approx(elim[labels >= 0].mean()) and groups[6] == 0.0
    single = RecallSpec(key_len=3).check()
    lab, el = single.targets("valid", 2000)
    assert set(np.unique(lab)) == {-1, 0, 1, 2} and np.isnan(el).all()
