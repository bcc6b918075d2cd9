"""The memory bank: the memory of every stream slot, kept outside the DeepSpeed engine.

One class serves the data-parallel trainer (a slot holds the whole model's MemoryState) and the
pipeline stages (a slot holds one stage part's state: the embedding part on the first stage, one
layer's part on the stage that runs it). Slot m holds the memory of the streams that micro-batch
m of every step carries, so every stream's memory continues its own text.

A training forward `put`s its slot's next state as pending; `settle(applied)` commits every
pending state once the optimizer step was applied on every rank, or drops them all when it was
skipped, so a skipped step leaves the memory as it was. Evaluation states replace their slot at
once, in a bank of their own: an evaluation never touches the training memory. States are
detached, replaced, never modified in place.
"""

from __future__ import annotations

import torch

from .memory import MemoryState

MODES = ("train", "eval")


class MemoryBank:
    """Committed training states, pending ones, and evaluation states, by slot (Stateful)."""

    def __init__(self, device: torch.device | str | None = None):
        """`device`: where load_state_dict puts the loaded states (None: leave them on the CPU)."""
        self.device = device
        self.banks: dict[str, dict[int, MemoryState]] = {mode: {} for mode in MODES}
        self.pending: dict[int, MemoryState] = {}

    def get(self, slot: int, *, training: bool = True) -> MemoryState | None:
        """The committed state of `slot` (None: never written; the caller starts it empty)."""
        return self.banks["train" if training else "eval"].get(slot)

    def put(self, slot: int, state: MemoryState, *, training: bool = True) -> None:
        """Training: the state waits for settle(); evaluation: it replaces the slot now."""
        if training:
            self.pending[slot] = state.detach()
        else:
            self.banks["eval"][slot] = state.detach()

    def settle(self, applied: bool) -> None:
        """Commit the pending training states (the step was applied) or drop them (skipped)."""
        if applied:
            self.banks["train"].update(self.pending)
        self.pending = {}

    def reset(self, mode: str = "train") -> None:
        """Forget every slot of `mode` ("train" or "eval")."""
        if mode not in MODES:
            raise ValueError(f"memory bank mode {mode!r}: expected one of {MODES}")
        self.banks[mode] = {}
        if mode == "train":
            self.pending = {}

    def state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        """The committed training memory, slot -> its tensors on the CPU (evaluation memory is
        transient)."""
        return {slot: {k: v.detach().cpu() for k, v in st.tensors().items()}
                for slot, st in sorted(self.banks["train"].items())}

    def load_state_dict(self, d: dict) -> None:
        self.banks["train"] = {
            int(slot): MemoryState.from_tensors(
                {k: v.to(self.device) if self.device is not None else v for k, v in t.items()})
            for slot, t in d.items()}
        self.pending = {}
