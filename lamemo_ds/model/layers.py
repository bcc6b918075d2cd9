"""One decoder layer: relative-position attention (+ LaMemo look-ahead) and the FFN.

A layer is a pure function of its arguments (hidden rows, the shared position table, the biases
and its own old memory state): activation checkpointing and pipeline stages rely on that.
Names: B batch, N segment, M memory buffer, K = M + N, H heads, D head size, d model size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config.schema import ModelConfig
from ..ops import attention as attn_ops
from ..ops import dispatch
from .dropout import Dropout, relu_dropout
from .linear import Linear
from .memory import merge_lookahead


class _SplitHeads(torch.autograd.Function):
    """[B, T, C*H*D] -> C contiguous [B, H, T, D] tensors, one copy each way.

    Viewing the chunks as permuted strides instead makes every attention matmul copy its
    operand (heads are not evenly strided there) and its backward stack and copy again.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, chunks: int, heads: int):
        b, t, c = x.shape
        ctx.meta = (b, t, chunks, heads, c // (chunks * heads))
        parts = x.view(b, t, chunks, heads, -1)
        return tuple(parts[:, :, i].transpose(1, 2).contiguous() for i in range(chunks))

    @staticmethod
    def backward(ctx, *grads):
        b, t, chunks, heads, d = ctx.meta
        some = next(g for g in grads if g is not None)
        make = some.new_empty if all(g is not None for g in grads) else some.new_zeros
        out = make(b, t, chunks, heads, d)
        for i, g in enumerate(grads):
            if g is not None:
                out[:, :, i].copy_(g.transpose(1, 2))
        return out.view(b, t, chunks * heads * d), None, None


def split_heads(x: torch.Tensor, chunks: int, heads: int) -> tuple[torch.Tensor, ...]:
    """The C = `chunks` projections in x [B, T, C*H*D] (e.g. Q, K, V), each [B, H, T, D]."""
    return _SplitHeads.apply(x, chunks, heads)


@dataclass(frozen=True)
class Biases:
    """Content/position biases of both branches, each [H, D]."""

    u: torch.Tensor
    v: torch.Tensor
    u_la: torch.Tensor | None = None
    v_la: torch.Tensor | None = None


class PositionBiases(nn.Module):
    """u, v and the look-ahead v' (and u' for separate_content_bias), shared by all layers
    (or owned by one layer with untie_r). signed_distance reuses v for the look-ahead branch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        shape = (cfg.n_head, cfg.d_head)
        self.variant = cfg.variant
        self.r_w_bias = nn.Parameter(torch.zeros(shape))  # u
        self.r_r_bias = nn.Parameter(torch.zeros(shape))  # v
        self.has_future = cfg.memory == "lamemo" and cfg.variant != "signed_distance"
        if self.has_future:
            self.r_r_bias_future = nn.Parameter(torch.zeros(shape))  # v'
        if cfg.memory == "lamemo" and cfg.variant == "separate_content_bias":
            self.r_w_bias_future = nn.Parameter(torch.zeros(shape))  # u'

    def forward(self) -> Biases:
        v_la = self.r_r_bias_future if self.has_future else self.r_r_bias
        u_la = getattr(self, "r_w_bias_future", self.r_w_bias)
        return Biases(u=self.r_w_bias, v=self.r_r_bias, u_la=u_la, v_la=v_la)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_inner)
        self.fc2 = Linear(cfg.d_inner, cfg.d_model)  # nn.Linear, faster CPU backward
        self.norm = nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.pre_lnorm = cfg.pre_lnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.norm(x) if self.pre_lnorm else x
        hidden = relu_dropout(self.fc1(inp), self.drop.p, self.training)  # [.., d_inner]
        core = self.drop(self.fc2(hidden))
        return x + core if self.pre_lnorm else self.norm(x + core)


@dataclass(frozen=True)
class LayerOut:
    """Current rows [B,N,d]; refreshed memory rows [B,M,d] (lamemo, None for the last layer);
    new ctx [B,M,H,D] / lse [B,M,H] (lamemo); mean alpha over real memory rows (diagnostic)."""

    cur: torch.Tensor
    mem: torch.Tensor | None = None
    ctx: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    alpha: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.n_head * cfg.d_head
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * hd, bias=False)  # rows: Q, K, V
        self.r_net = nn.Linear(cfg.d_model, hd, bias=False)
        self.o_net = nn.Linear(hd, cfg.d_model, bias=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.ff = FeedForward(cfg)
        self.biases = PositionBiases(cfg) if cfg.untie_r else None

    # -- pieces ----------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H*D] -> [B, H, T, D]."""
        b, t, _ = x.shape
        return x.view(b, t, self.cfg.n_head, self.cfg.d_head).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, H*D]."""
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)

    def _residual(self, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.o_net(att))
        return h + out if self.cfg.pre_lnorm else self.norm(h + out)

    def _causal(self, q, k, v, r_c, b: Biases, valid, mem_len, same_length):
        return dispatch.causal_attention(
            q, k, v, r_c, b.u, b.v, valid=valid, mem_len=mem_len, same_length=same_length,
            dropatt=self.cfg.dropatt, training=self.training, impl=self.cfg.attention_impl)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, cur: torch.Tensor, mem: torch.Tensor | None, pos: torch.Tensor,
                biases: Biases | None, valid: torch.Tensor, ctx: torch.Tensor | None = None,
                lse: torch.Tensor | None = None, *, same_length: bool = False,
                need_mem_out: bool = True) -> LayerOut:
        """cur [B,N,d]; mem [B,M,d] memory inputs (None: no memory); pos [K(+X), d] position
        table (causal distances K-1..0, then the look-ahead distances); ctx/lse: this layer's
        old lamemo state (None for xl); valid [B] real memory rows."""
        b = self.biases() if self.biases is not None else biases
        n = cur.shape[1]
        m = 0 if mem is None else mem.shape[1]
        k_len = m + n
        h = cur if m == 0 else torch.cat([mem, cur], 1)  # [B, K, d]
        x = self.norm(h) if self.cfg.pre_lnorm else h
        r = self.r_net(pos).view(-1, self.cfg.n_head, self.cfg.d_head)  # [K(+X), H, D]
        lamemo = ctx is not None and m > 0
        hd = self.cfg.n_head * self.cfg.d_head
        if lamemo:
            q, k, v = split_heads(self.qkv(x), 3, self.cfg.n_head)  # each [B, H, K, D]
        else:
            w = self.qkv.weight
            q = self._heads(nn.functional.linear(x[:, m:], w[:hd]))  # [B, H, N, D]
            k, v = split_heads(nn.functional.linear(x, w[hd:]), 2, self.cfg.n_head)
        q_cur = q[:, :, m:] if lamemo else q
        o, lse_cur = self._causal(q_cur, k, v, r[:k_len], b, valid, m, same_length)
        if not lamemo:
            return LayerOut(cur=self.ff(self._residual(cur, self._merge_heads(o))))
        return self._lamemo_tail(h, q, k, v, r[k_len:], b, valid, o, lse_cur, ctx, lse,
                                 need_mem_out=need_mem_out)

    def _lamemo_tail(self, h, q, k, v, r_la, b: Biases, valid, o, lse_cur, ctx_old, lse_old,
                     *, need_mem_out: bool) -> LayerOut:
        """Look-ahead attention, the merge, W_o / LN / FFN and the state update
        (docs/algorithm.md §3-4)."""
        m = ctx_old.shape[1]
        n = o.shape[2]
        start, width = attn_ops.lookahead_window(mem_len=m, seg_len=n)
        e, lse_la = dispatch.lookahead_attention(
            q[:, :, :m], k[:, :, start:start + width], v[:, :, start:start + width], r_la,
            b.u_la, b.v_la, valid=valid, mem_len=m, window_start=start,
            variant=self.cfg.variant, dropatt=self.cfg.dropatt, training=self.training,
            impl=self.cfg.attention_impl)  # [B,H,M,D], [B,H,M]
        real = torch.arange(m, device=valid.device)[None, :] >= (m - valid)[:, None]  # [B, M]
        old = lse_old.transpose(1, 2)  # [B, H, M]
        old = torch.where(real[:, None, :], old, torch.full_like(old, float("-inf")))
        ctx, lse_mem, alpha = merge_lookahead(ctx_old.transpose(1, 2), old, e, lse_la)
        heads = torch.cat([ctx, o], 2)  # [B, H, K, D]: refreshed memory rows, then current
        new_ctx = heads[:, :, -m:].transpose(1, 2).detach()  # [B, M, H, D]
        new_lse = torch.cat([lse_mem, lse_cur], 2)[:, :, -m:].transpose(1, 2).detach()  # [B,M,H]
        realf = real.to(alpha.dtype)[:, None, :]
        mean_alpha = ((alpha * realf).sum() / (realf.sum() * alpha.shape[1]).clamp(min=1))
        if need_mem_out:
            att = self._merge_heads(heads)  # [B, K, H*D]
            y = self.ff(self._residual(h, att))
            mem_out, cur_out = y[:, :m], y[:, m:]
        else:  # the last layer's memory rows feed nothing: skip their W_o, LN and FFN
            cur_out = self.ff(self._residual(h[:, m:], self._merge_heads(o)))
            mem_out = None
        return LayerOut(cur=cur_out, mem=mem_out, ctx=new_ctx, lse=new_lse,
                        alpha=mean_alpha.detach())
