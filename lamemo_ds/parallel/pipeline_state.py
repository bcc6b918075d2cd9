"""Stage-local recurrent memory of a pipeline stage: per-slot banks, train and eval apart.

Under pipeline parallelism the memory of layer l lives on the stage that owns layer l (the
embedding memory and the valid-row counts on stage 0). Slot m holds the memory of the streams
that micro-batch m of every step carries. A forward writes the slot's next state to `pending`;
the trainer commits it once the optimizer step was applied everywhere (or drops it when the step
was skipped), so a skipped step leaves the memory as it was, as on the data-parallel path.
Evaluation writes straight into a separate bank that never touches the training memory.
States are dicts of detached tensors, replaced, never modified in place.
"""

from __future__ import annotations

import torch

Slot = dict[str, torch.Tensor]


class SlotBank:
    """Memory of one stage part (one layer, or the embedding) for every slot and mode."""

    def __init__(self) -> None:
        self.banks: dict[str, dict[int, Slot]] = {"train": {}, "eval": {}}
        self.pending: dict[int, Slot] = {}

    @staticmethod
    def mode(training: bool) -> str:
        return "train" if training else "eval"

    def get(self, training: bool, slot: int) -> Slot | None:
        """The committed state of `slot` (None: never written, start empty)."""
        return self.banks[self.mode(training)].get(slot)

    def put(self, training: bool, slot: int, state: Slot) -> None:
        """Training: the state waits for commit(); evaluation: replaces the slot now."""
        state = {k: v.detach() for k, v in state.items()}
        if training:
            self.pending[slot] = state
        else:
            self.banks["eval"][slot] = state

    def commit(self) -> None:
        self.banks["train"].update(self.pending)
        self.pending = {}

    def discard(self) -> None:
        self.pending = {}

    def reset(self, mode: str) -> None:
        """Forget every slot of `mode` ("train" or "eval")."""
        self.banks[mode] = {}
        if mode == "train":
            self.pending = {}

    def state_dict(self) -> dict:
        """The committed training memory (evaluation memory is transient), on the CPU."""
        return {slot: {k: v.cpu() for k, v in st.items()}
                for slot, st in self.banks["train"].items()}

    def load_state_dict(self, d: dict, device: torch.device) -> None:
        self.banks["train"] = {int(slot): {k: v.to(device) for k, v in st.items()}
                               for slot, st in d.items()}
        self.pending = {}


def fits(state: Slot | None, *, batch: int, mem_len: int) -> bool:
    """True when a stored state has the shapes the current micro-batch needs."""
    if state is None:
        return False
    return all(t.shape[0] == batch for t in state.values()) and all(
        t.shape[1] == mem_len for k, t in state.items() if k != "valid")
