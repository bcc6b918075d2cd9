"""LaMemoLM: the whole model, readable top to bottom.

    out = model(tokens, state=None, targets=y)   # tokens [B, N] int64
    out.loss, out.nll, out.logits, out.state     # out.state carries the memory to the next segment

memory = "lamemo" (look-ahead memory, default), "xl" (Transformer-XL cache) or "none".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config.schema import ModelConfig
from .adaptive import AdaptiveEmbedding, AdaptiveSoftmax
from .dropout import Dropout
from .layers import DecoderLayer, PositionBiases
from .memory import MemoryState, empty_state
from .positional import SinusoidTable
from .step import layer_step, memory_kind, relative_positions


@dataclass
class LMOutput:
    """loss: mean NLL over targets (None without targets); nll [B,N]; logits [B,N,V]
    log-probabilities (only when asked, or without targets); state: the next memory;
    alpha: mean interpolation weight per layer (lamemo diagnostics, detached)."""

    state: MemoryState
    loss: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    alpha: list[torch.Tensor] = field(default_factory=list)


class LaMemoLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.validate()
        self.config = cfg
        self.word_emb = AdaptiveEmbedding(cfg.vocab_size, cfg.d_model, cfg.cutoffs, cfg.div_val)
        self.pos_emb = SinusoidTable(cfg.d_model)
        self.biases = None if cfg.untie_r else PositionBiases(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.crit = AdaptiveSoftmax(cfg.vocab_size, cfg.d_model, cfg.cutoffs, cfg.div_val)
        self.drop = Dropout(cfg.dropout)
        self.activation_checkpointing = False
        self.reset_parameters()
        self.tie_weights()

    # -- parameters -----------------------------------------------------------------------
    def tie_weights(self) -> None:
        cfg = self.config
        if cfg.tie_weight:
            for out, emb in zip(self.crit.out_layers, self.word_emb.emb_layers):
                out.weight = emb.weight
        if cfg.tie_projs and cfg.div_val > 1:
            for i in range(1, len(self.crit.out_projs)):
                self.crit.out_projs[i] = self.word_emb.emb_projs[i]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference training script's init (docs/algorithm.md §5)."""
        std, pstd = self.config.init_std, self.config.proj_init_std
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                (nn.init.normal_(p, 1.0, std) if leaf == "weight" else nn.init.zeros_(p))
            elif "projs" in name:
                nn.init.normal_(p, 0.0, pstd)
            elif leaf in ("r_w_bias", "r_r_bias"):
                nn.init.normal_(p, 0.0, std)
            elif leaf in ("r_r_bias_future", "r_w_bias_future"):
                nn.init.xavier_uniform_(p)
            elif leaf == "bias" or leaf == "cluster_bias":
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared tensors counted once

    # -- state ----------------------------------------------------------------------------
    def init_state(self, batch_size: int, mem_len: int | None = None, device=None,
                   dtype: torch.dtype | None = None) -> MemoryState:
        """Empty memory for `batch_size` streams; mem_len defaults to model.mem_len and may be
        longer at evaluation (the state's buffer length is the one source of truth)."""
        cfg = self.config
        p = next(self.parameters())
        return empty_state(cfg.memory, batch_size=batch_size,
                           mem_len=cfg.mem_len if mem_len is None else mem_len,
                           n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head,
                           d_head=cfg.d_head, dtype=dtype or p.dtype, device=device or p.device)

    # -- forward --------------------------------------------------------------------------
    def position_table(self, *, mem_len: int, seg_len: int, clamp_len: int,
                       device, dtype) -> torch.Tensor:
        """[K (+X), d]: causal distances K-1..0, then the look-ahead ones (lamemo), dropped out."""
        return relative_positions(memory_kind(self.config.memory, mem_len), self.pos_emb,
                                  self.drop, variant=self.config.variant, mem_len=mem_len,
                                  seg_len=seg_len, clamp_len=clamp_len, device=device, dtype=dtype)

    def forward(self, tokens: torch.Tensor, state: MemoryState | None = None,
                targets: torch.Tensor | None = None, *, return_logits: bool | None = None,
                clamp_len: int | None = None, same_length: bool | None = None) -> LMOutput:
        cfg = self.config
        if state is None:
            state = self.init_state(tokens.shape[0], device=tokens.device)
        clamp = cfg.clamp_len if clamp_len is None else clamp_len
        same = cfg.same_length if same_length is None else same_length
        m, n = state.mem_len, tokens.shape[1]
        kind = memory_kind(cfg.memory, m)  # how each layer reads and leaves its memory
        emb = self.drop(self.word_emb(tokens))  # [B, N, d]
        pos = self.position_table(mem_len=m, seg_len=n, clamp_len=clamp, device=emb.device,
                                  dtype=emb.dtype)
        biases = self.biases() if self.biases is not None else None
        flow, parts, alphas = kind.start(emb, state), [], []
        recompute = self.activation_checkpointing and self.training
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            flow, part, alpha = layer_step(layer, flow, state.layer(i), pos=pos, biases=biases,
                                           valid=state.valid, same_length=same, last=i == last,
                                           recompute=recompute)
            parts.append(part)
            if alpha is not None:
                alphas.append(alpha)
        hidden = self.drop(flow.cur)
        out = LMOutput(state=kind.next_state(state, emb, parts), alpha=alphas)
        if targets is not None:
            out.nll = self.crit.nll(hidden, targets)
            out.loss = out.nll.mean()
        if return_logits or (return_logits is None and targets is None):
            out.logits = self.crit.log_probs(hidden)
        return out
