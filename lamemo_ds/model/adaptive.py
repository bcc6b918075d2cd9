"""Adaptive input embeddings and adaptive softmax (Baevski & Auli; Transformer-XL's variant).

With no cutoffs both are a plain embedding and a (tied) linear softmax with bias. Parameter
layout follows the reference so checkpoints map one to one (convert/keymap.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _bounds(vocab_size: int, cutoffs: tuple[int, ...]) -> list[int]:
    return [0, *cutoffs, vocab_size]


class AdaptiveEmbedding(nn.Module):
    """Token ids [B, T] -> embeddings [B, T, d] scaled by sqrt(d)."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs: tuple[int, ...], div_val: int):
        super().__init__()
        self.d_model = d_model
        self.scale = d_model**0.5
        self.bounds = _bounds(vocab_size, cutoffs)
        self.div_val = div_val
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(vocab_size, d_model))
        else:
            for i in range(len(self.bounds) - 1):
                d_i = d_model // (div_val**i)
                self.emb_layers.append(nn.Embedding(self.bounds[i + 1] - self.bounds[i], d_i))
                self.emb_projs.append(nn.Parameter(torch.empty(d_model, d_i)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.div_val == 1:
            return self.emb_layers[0](tokens) * self.scale
        dtype = self.emb_projs[0].dtype
        flat = tokens.reshape(-1)
        out = torch.zeros(flat.shape[0], self.d_model, dtype=dtype, device=tokens.device)
        for i, emb in enumerate(self.emb_layers):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            e = F.linear(emb(flat[idx] - lo), self.emb_projs[i])  # [n, d]
            out = out.index_copy(0, idx, e)
        return out.view(*tokens.shape, self.d_model) * self.scale


class AdaptiveSoftmax(nn.Module):
    """Hidden [.., d] -> per-token NLL or full log-probabilities over the vocabulary."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs: tuple[int, ...], div_val: int):
        super().__init__()
        self.bounds = _bounds(vocab_size, cutoffs)
        self.n_clusters = len(cutoffs)
        self.div_val = div_val
        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_model))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        if div_val == 1:
            self.out_layers.append(nn.Linear(d_model, vocab_size))
        else:
            for i in range(len(self.bounds) - 1):
                d_i = d_model // (div_val**i)
                self.out_layers.append(nn.Linear(d_i, self.bounds[i + 1] - self.bounds[i]))
                self.out_projs.append(nn.Parameter(torch.empty(d_model, d_i)))

    def _cluster_params(self, i: int):
        """(weight, bias, proj or None) of cluster i (cluster 0 = the head without cluster rows)."""
        if self.div_val == 1:
            lo, hi = self.bounds[i], self.bounds[i + 1]
            layer = self.out_layers[0]
            return layer.weight[lo:hi], layer.bias[lo:hi], None
        return self.out_layers[i].weight, self.out_layers[i].bias, self.out_projs[i]

    @staticmethod
    def _logit(h, weight, bias, proj):
        if proj is not None:
            h = h @ proj  # [n, d] @ [d, d_i] -> [n, d_i]
        return F.linear(h, weight, bias)

    def _head_logprob(self, h: torch.Tensor) -> torch.Tensor:
        w, b, p = self._cluster_params(0)
        if self.n_clusters > 0:
            w = torch.cat([w, self.cluster_weight], 0)
            b = torch.cat([b, self.cluster_bias], 0)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32  # never below fp32
        return F.log_softmax(self._logit(h, w, b, p).to(acc), dim=-1)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[.., d] -> [.., V] float32 (float64 for float64 hidden) log-probabilities."""
        h = hidden.reshape(-1, hidden.shape[-1])
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        head = self._head_logprob(h).to(acc)
        if self.n_clusters == 0:
            return head.view(*hidden.shape[:-1], -1)
        parts = [head[:, : self.bounds[1]]]
        for i in range(1, self.n_clusters + 1):
            w, b, p = self._cluster_params(i)
            tail = F.log_softmax(self._logit(h, w, b, p).to(acc), dim=-1)
            # The reference orders cluster logits last-to-first: cluster i is head column -i.
            parts.append(head[:, -i].unsqueeze(1) + tail)
        return torch.cat(parts, 1).view(*hidden.shape[:-1], -1)

    def nll(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood [..] (fp32, fp64 for fp64 hidden)."""
        h = hidden.reshape(-1, hidden.shape[-1])
        y = target.reshape(-1)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        if self.n_clusters == 0:
            w, b, p = self._cluster_params(0)
            logits = self._logit(h, w, b, p).to(acc)
            return F.cross_entropy(logits, y, reduction="none").view(target.shape)
        head = self._head_logprob(h).to(acc)
        out = torch.zeros(y.shape[0], dtype=acc, device=h.device)
        shortlist = y < self.bounds[1]
        out = torch.where(shortlist, -head.gather(1, y.clamp(max=self.bounds[1] - 1)[:, None])
                          .squeeze(1), out)
        for i in range(1, self.n_clusters + 1):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            idx = ((y >= lo) & (y < hi)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            w, b, p = self._cluster_params(i)
            tail = F.log_softmax(self._logit(h[idx], w, b, p).to(acc), dim=-1)
            lp = head[idx, -i] + tail.gather(1, (y[idx] - lo)[:, None]).squeeze(1)
            out = out.index_copy(0, idx, -lp)
        return out.view(target.shape)
