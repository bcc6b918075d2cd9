"""Token-by-token decoding with the memory carried: the one rule `lamemo generate` and the Hugging
Face export's `generate()` share (the export's modeling file includes this module).

How the memory is carried:
- lamemo / none: the state advances only at segment boundaries (every `segment_len` tokens), as in
  training and evaluation; inside a segment the tokens since the boundary are re-run against the
  boundary state, so every next-token distribution equals the one segment-wise evaluation gives.
- xl: the Transformer-XL cache: each new token is one forward of length 1 against the cached
  hidden states of the last mem_len tokens, then appended to that cache (O(mem_len) per token,
  the prompt is never re-run).
"""

from __future__ import annotations

import torch

from .memory import MemoryState


class Stepper:
    """Feeds tokens and returns the next-token log-probabilities (see the module docstring).

    Every stream of the batch advances by the same tokens count. `forward_tokens` counts the
    tokens run through the model per stream (the cost, used by tests to check that the xl cache
    never re-runs the context); `seen` counts the tokens fed.

    Args:
        model: a LaMemoLM.
        batch_size: streams decoded side by side.
        mem_len: memory length (default: the model's).
    """

    def __init__(self, model, *, batch_size: int = 1, mem_len: int | None = None):
        self.model = model.eval()
        self.cfg = model.config
        self.state: MemoryState = model.init_state(batch_size, mem_len=mem_len)
        self.buffer = torch.zeros(batch_size, 0, dtype=torch.long, device=self.state.valid.device)
        self.forward_tokens = 0
        self.seen = 0
        self.cached = self.cfg.memory == "xl" and self.state.mem_len > 0

    def _run(self, ids: torch.Tensor):
        self.forward_tokens += ids.shape[1]
        with torch.no_grad():
            return self.model(ids, self.state, return_logits=True)

    def feed(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Consume `ids` (a list: one stream; or [B, n]); return the log-probabilities of the token
        after them ([V] for a list, [B, V] for a tensor)."""
        one = not torch.is_tensor(ids)
        x = torch.as_tensor([ids] if one else ids, dtype=torch.long,
                            device=self.buffer.device)  # [B, n]
        if x.shape[1] == 0:
            raise ValueError("Stepper.feed needs at least one token")
        self.seen += x.shape[1]
        logits = self._feed_cached(x) if self.cached else self._feed_segments(x)
        return logits[0] if one else logits

    def _feed_cached(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for j in range(x.shape[1]):
            out = self._run(x[:, j:j + 1])  # [B, 1]
            self.state = out.state
        return out.logits[:, -1]

    def _feed_segments(self, x: torch.Tensor) -> torch.Tensor:
        n = self.cfg.segment_len
        logits = None
        for j in range(x.shape[1]):
            self.buffer = torch.cat([self.buffer, x[:, j:j + 1]], 1)  # [B, k]
            if self.buffer.shape[1] == n:  # a full segment: advance the memory
                out = self._run(self.buffer)
                self.state, self.buffer = out.state, self.buffer[:, :0]
                logits = out.logits[:, -1]
            else:
                logits = None
        if logits is None:  # mid-segment: re-run the partial segment against the boundary
            logits = self._run(self.buffer).logits[:, -1]
        return logits
