"""State banks: the memory of every stream slot, kept outside the DeepSpeed engine.

Slot m holds the MemoryState of the streams that micro-batch m of every step carries. Training
and evaluation use separate banks, so an evaluation never disturbs the training memory.
"""

from __future__ import annotations

import torch

from .memory import MemoryState


class StateBank:
    """One MemoryState per micro-batch slot, with checkpointable state."""

    def __init__(self, slots: int, make_state):
        """`make_state()` returns an empty MemoryState for one slot (right dtype and device)."""
        self.make_state = make_state
        self.states: list[MemoryState] = [make_state() for _ in range(slots)]

    def __len__(self) -> int:
        return len(self.states)

    def get(self, slot: int, reset: torch.Tensor) -> MemoryState:
        """The memory of `slot` with streams flagged in reset [rows] forgotten."""
        return self.states[slot].reset(reset)

    def commit(self, new_states: list[MemoryState]) -> None:
        """Replace every slot at once (called only for a step that was applied)."""
        if len(new_states) != len(self.states):
            raise ValueError(f"expected {len(self.states)} slot states, got {len(new_states)}")
        self.states = [s.detach() for s in new_states]

    def reset_all(self) -> None:
        self.states = [self.make_state() for _ in self.states]

    def state_dict(self) -> dict:
        return {"mem_len": [s.mem_len for s in self.states],
                "slots": [{k: v.detach().cpu() for k, v in s.tensors().items()}
                          for s in self.states]}

    def load_state_dict(self, d: dict) -> None:
        if len(d["slots"]) != len(self.states):
            raise ValueError(f"state bank has {len(self.states)} slots but the checkpoint has "
                             f"{len(d['slots'])}")
        ref = self.states[0].valid.device
        self.states = [MemoryState.from_tensors({k: v.to(ref) for k, v in t.items()}, m)
                       for t, m in zip(d["slots"], d["mem_len"])]
