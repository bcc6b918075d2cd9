"""A slow, obviously-right LaMemo / Transformer-XL / no-memory LM written from
docs/algorithm.md §1-§5.

This is a test oracle, not a second model: plain Python floats (float64), one score at a time,
loops over streams, positions and heads, and memory kept as Python lists of its *real* rows
(oldest first), so nothing here shares the model's buffer layout, masks, shifts or gathers. The
only thing taken from the model is its parameters, read by name from `state_dict()`.

Besides ctx / lse it records, for every memory token, layer and head, every (score, value) pair
the token has attended to so far (`seen`): the interpolation-exactness property test checks that
the carried ctx equals ONE softmax over that union.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, also the reference's
MERGE_EPS = 1e-6  # docs/algorithm.md §3: the epsilon in the interpolation weight

Vec = list[float]


def dot(a: Vec, b: Vec) -> float:
    return sum(x * y for x, y in zip(a, b))


def add(a: Vec, b: Vec) -> Vec:
    return [x + y for x, y in zip(a, b)]


def matvec(w: list[Vec], x: Vec) -> Vec:
    """w [out][in] (torch Linear layout) times x [in]."""
    return [dot(row, x) for row in w]


def layer_norm(x: Vec, w: Vec, b: Vec) -> Vec:
    mu = sum(x) / len(x)
    var = sum((xi - mu) ** 2 for xi in x) / len(x)
    inv = 1.0 / math.sqrt(var + LN_EPS)
    return [(xi - mu) * inv * wi + bi for xi, wi, bi in zip(x, w, b)]


def logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def sinusoid(x: float, d: int) -> Vec:
    """P(x) = [sin(x f_k) ; cos(x f_k)], f_k = 10000^(-2k/d), k = 0..d/2-1 (docs/algorithm.md §2).

    f_k is rounded to float32 as the reference's `inv_freq` buffer is (a float64 model keeps
    those rounded constants); exact f_k would differ by ~1e-9 in the outputs and force a
    looser tolerance on every comparison.
    """
    freqs = [float(1.0 / (torch.tensor(10000.0) ** (torch.tensor(2.0 * k) / d)))
             for k in range(d // 2)]
    return [math.sin(x * f) for f in freqs] + [math.cos(x * f) for f in freqs]


def softmax_attend(scores: list[float], values: list[Vec]) -> tuple[Vec, float]:
    """(sum_j softmax(scores)_j values_j, logsumexp(scores))."""
    lse = logsumexp(scores)
    out = [0.0] * len(values[0])
    for s, v in zip(scores, values):
        p = math.exp(s - lse)
        out = [o + p * vi for o, vi in zip(out, v)]
    return out, lse


@dataclass
class StreamMemory:
    """One stream's memory, real rows only, oldest first."""

    emb: list[Vec] = field(default_factory=list)  # lamemo: layer-1 memory input
    ctx: list[list[list[Vec]]] = field(default_factory=list)  # [layer][row][head] -> [D]
    lse: list[list[list[float]]] = field(default_factory=list)  # [layer][row][head]
    seen: list[list[list[list[tuple[float, Vec]]]]] = field(default_factory=list)
    hidden: list[list[Vec]] = field(default_factory=list)  # xl: [layer][row] -> [d]


class NaiveLM:
    """docs/algorithm.md §1-§5 by the letter. `mem_len` is the memory length M (0 for
    memory='none')."""

    def __init__(self, state_dict: dict[str, torch.Tensor], *, memory: str, variant: str,
                 n_layer: int, n_head: int, d_head: int, mem_len: int, clamp_len: int = -1,
                 same_length: bool = False):
        self.p = {k: v.detach().double().tolist() for k, v in state_dict.items()}
        self.memory, self.variant = memory, variant
        self.n_layer, self.n_head, self.d_head = n_layer, n_head, d_head
        self.mem_len = 0 if memory == "none" else mem_len
        self.clamp_len, self.same_length = clamp_len, same_length
        self.d_model = len(self.p["word_emb.emb_layers.0.weight"][0])
        self._rel_cache: dict[tuple[int, float], list[Vec]] = {}

    def empty(self) -> StreamMemory:
        n = self.n_layer
        return StreamMemory(ctx=[[] for _ in range(n)], lse=[[] for _ in range(n)],
                            seen=[[] for _ in range(n)], hidden=[[] for _ in range(n)])

    # -- pieces ------------------------------------------------------------------------------
    def rel(self, layer: int, x: float) -> list[Vec]:
        """R(x) = W_r P(x) split per head; clamp_len clamps x from above (docs/algorithm.md §5)."""
        if self.clamp_len > 0:
            x = min(x, self.clamp_len)
        key = (layer, float(x))
        if key not in self._rel_cache:
            r = matvec(self.p[f"layers.{layer}.r_net.weight"], sinusoid(float(x), self.d_model))
            self._rel_cache[key] = self.heads(r)
        return self._rel_cache[key]

    def heads(self, x: Vec) -> list[Vec]:
        d = self.d_head
        return [x[h * d:(h + 1) * d] for h in range(self.n_head)]

    def lookahead_biases(self) -> tuple[list[Vec], list[Vec]]:
        """(content bias, position bias) of the look-ahead branch for this variant."""
        u = self.p["biases.r_w_bias"]
        if self.variant == "separate_content_bias":
            u = self.p["biases.r_w_bias_future"]
        v = self.p["biases.r_r_bias"] if self.variant == "signed_distance" else \
            self.p["biases.r_r_bias_future"]
        return u, v

    def lookahead_distance(self, i: int, p: int) -> int:
        if self.variant == "signed_distance":
            return -(p - i)
        return abs(p - i)  # masked variants only ever see p > i

    def ffn(self, layer: int, x: Vec) -> Vec:
        pre = f"layers.{layer}.ff."
        hid = [max(0.0, a) for a in add(matvec(self.p[pre + "fc1.weight"], x),
                                        self.p[pre + "fc1.bias"])]
        core = add(matvec(self.p[pre + "fc2.weight"], hid), self.p[pre + "fc2.bias"])
        return layer_norm(add(x, core), self.p[pre + "norm.weight"], self.p[pre + "norm.bias"])

    def out_row(self, layer: int, h: Vec, att_heads: list[Vec]) -> Vec:
        """FFN(LN_attn(h + W_o [heads concatenated]))."""
        pre = f"layers.{layer}."
        att = [a for head in att_heads for a in head]
        y = layer_norm(add(h, matvec(self.p[pre + "o_net.weight"], att)),
                       self.p[pre + "norm.weight"], self.p[pre + "norm.bias"])
        return self.ffn(layer, y)

    # -- attention -----------------------------------------------------------------------------
    def project(self, layer: int, rows: list[Vec]) -> tuple[list, list, list]:
        """q, k, v per row and head; the fused weight's rows are Q, then K, then V."""
        w = self.p[f"layers.{layer}.qkv.weight"]
        hd = self.n_head * self.d_head
        q = [self.heads(matvec(w[:hd], x)) for x in rows]
        k = [self.heads(matvec(w[hd:2 * hd], x)) for x in rows]
        v = [self.heads(matvec(w[2 * hd:], x)) for x in rows]
        return q, k, v

    def causal(self, layer, q, k, v, m: int, n: int):
        """docs/algorithm.md §2 for current token t (position m + t) and head h, one score at a
        time."""
        s = 1.0 / math.sqrt(self.d_head)
        u, vb = self.p["biases.r_w_bias"], self.p["biases.r_r_bias"]
        o, lse, seen = [], [], []
        for t in range(n):
            o_t, lse_t, seen_t = [], [], []
            for h in range(self.n_head):
                keys = [j for j in range(m + t + 1)
                        if not (self.same_length and m + t - j >= self.mem_len > 0)]
                scores = [s * (dot(add(q[m + t][h], u[h]), k[j][h])
                               + dot(add(q[m + t][h], vb[h]), self.rel(layer, m + t - j)[h]))
                          for j in keys]
                out, z = softmax_attend(scores, [v[j][h] for j in keys])
                o_t.append(out)
                lse_t.append(z)
                seen_t.append([(sc, v[j][h]) for sc, j in zip(scores, keys)])
            o.append(o_t)
            lse.append(lse_t)
            seen.append(seen_t)
        return o, lse, seen

    def lookahead(self, layer, q, k, v, m: int, n: int, mem: StreamMemory):
        """docs/algorithm.md §3: memory token i over window [max(m-n+1, 1), m], p > i; exact
        merge."""
        s = 1.0 / math.sqrt(self.d_head)
        u, vb = self.lookahead_biases()
        window = range(max(m - n + 1, 1), m + 1)
        ctx, lse, seen = [], [], []
        for i in range(m):
            c_i, l_i, s_i = [], [], []
            for h in range(self.n_head):
                keys = [p for p in window if p > i or self.variant == "unmasked_window"]
                scores = [s * (dot(add(q[i][h], u[h]), k[p][h])
                               + dot(add(q[i][h], vb[h]),
                                     self.rel(layer, self.lookahead_distance(i, p))[h]))
                          for p in keys]
                e, d_new = softmax_attend(scores, [v[p][h] for p in keys])
                d_old, c_old = mem.lse[layer][i][h], mem.ctx[layer][i][h]
                big = max(d_old, d_new)
                a = math.exp(d_old - big)
                alpha = a / (a + math.exp(d_new - big) + MERGE_EPS)
                c_i.append([alpha * co + (1 - alpha) * ei for co, ei in zip(c_old, e)])
                l_i.append(big + math.log(a + math.exp(d_new - big)))
                s_i.append(mem.seen[layer][i][h] + [(sc, v[p][h]) for sc, p in zip(scores, keys)])
            ctx.append(c_i)
            lse.append(l_i)
            seen.append(s_i)
        return ctx, lse, seen

    # -- layers and the LM -------------------------------------------------------------------
    def layer(self, layer: int, h_mem: list[Vec], h_cur: list[Vec], mem: StreamMemory):
        """(refreshed memory rows or [], current rows, (ctx, lse, seen) rows of [mem ; cur])."""
        m, n = len(h_mem), len(h_cur)
        q, k, v = self.project(layer, h_mem + h_cur)
        o, lse_cur, seen_cur = self.causal(layer, q, k, v, m, n)
        cur_out = [self.out_row(layer, h_cur[t], o[t]) for t in range(n)]
        if self.memory != "lamemo" or m == 0:
            return [], cur_out, (o, lse_cur, seen_cur)
        ctx, lse_mem, seen_mem = self.lookahead(layer, q, k, v, m, n, mem)
        mem_out = [self.out_row(layer, h_mem[i], ctx[i]) for i in range(m)]
        return mem_out, cur_out, (ctx + o, lse_mem + lse_cur, seen_mem + seen_cur)

    def keep(self, rows: list) -> list:
        return rows[-self.mem_len:] if self.mem_len > 0 else []

    def segment(self, tokens: list[int], mem: StreamMemory) -> tuple[list[Vec], StreamMemory]:
        """One segment of one stream: (log-probabilities [N][V], next memory)."""
        emb_w = self.p["word_emb.emb_layers.0.weight"]
        scale = math.sqrt(self.d_model)
        cur = [[w * scale for w in emb_w[x]] for x in tokens]
        nxt = self.empty()
        nxt.emb = self.keep(mem.emb + cur)
        h_mem = mem.emb if self.memory == "lamemo" else []
        for layer in range(self.n_layer):
            if self.memory == "xl":
                h_mem = mem.hidden[layer]
                nxt.hidden[layer] = self.keep(h_mem + cur)
            h_mem, cur, (ctx, lse, seen) = self.layer(layer, h_mem, cur, mem)
            nxt.ctx[layer], nxt.lse[layer] = self.keep(ctx), self.keep(lse)
            nxt.seen[layer] = self.keep(seen)
        w, b = self.p["crit.out_layers.0.weight"], self.p["crit.out_layers.0.bias"]
        logprobs = []
        for hrow in cur:
            z = add(matvec(w, hrow), b)
            lz = logsumexp(z)
            logprobs.append([zi - lz for zi in z])
        return logprobs, nxt


def tiny_model(memory: str, variant: str = "default", *, seg_len: int, mem_len: int,
               seed: int = 0, dropout: float = 0.0, dropatt: float = 0.0, **overrides):
    """A tiny LaMemoLM (d 8, 2 layers, 2 heads of size 3 != d/H, vocab 11) with parameters
    redrawn at a larger scale than the reference init, so attention is far from uniform and
    every bias matters to the outputs."""
    from lamemo_ds.model import LaMemoLM, ModelConfig

    cfg = ModelConfig(vocab_size=11, n_layer=2, n_head=2, d_model=8, d_head=3, d_inner=12,
                      dropout=dropout, dropatt=dropatt, memory=memory, variant=variant,
                      segment_len=seg_len, mem_len=mem_len, attention_impl="eager",
                      **overrides)
    torch.manual_seed(seed)
    model = LaMemoLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return model.double()
