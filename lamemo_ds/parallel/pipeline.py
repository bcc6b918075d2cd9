"""LaMemo / XL as a DeepSpeed PipelineModule with stage-local recurrent memory.

The stages are built from a LaMemoLM's own modules (so P = 1 and P > 1 start from the same
weights and share parameter names):

    [IOStage(embed)] [BiasStage] DecoderStage(0) ... | [BiasStage] DecoderStage(k) .. [IOStage]

- IOStage holds word_emb and crit (tied: the same TiedLayerSpec "io" on the first and last stage;
  the parameters the model itself shares between them are the tied weights). Built for the first
  stage, it embeds the tokens and owns the embedding memory and the valid-row counts; built for
  the last, it returns the final hidden rows and `loss_fn` applies crit (a pipeline has at least
  two stages, so each stage builds its own IOStage).
- BiasStage carries the layer-shared biases u, v, v' (TiedLayerSpec "biases", one per stage);
  it passes activations through and the stage's DecoderStages read it. With model.untie_r every
  layer owns its biases and there is no BiasStage.
- DecoderStage(i) runs DecoderLayer i through the model's own per-layer step
  (model/step.py: `layer_step`) with the layer's LayerMemory (ctx/lse or the XL hidden) taken
  from its per-slot bank; the stages only place the layers.

Between stages flows exactly one float tensor with gradient, h [B, M+N, d] (lamemo: the
refreshed memory rows, then the current rows; xl/none: [B, N, d], their memory is stage-local)
and meta [B, 2] int64 = (slot, valid memory rows); `pack` / `unpack` turn a model Flow into h
and back. Position tables are recomputed per layer. DeepSpeed's private API is used only
through parallel/ds_adapter.py.
Every stage module keeps its memory in a model.bank.MemoryBank; `StageMemory` makes the banks of
this rank one Stateful (checkpoints, commit or drop after a step, reset).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from ..config.schema import ModelConfig, memory_len
from ..model import LaMemoLM
from ..model.bank import MemoryBank
from ..model.dropout import Dropout
from ..model.memory import LayerMemory, MemoryState, empty_state
from ..model.positional import SinusoidTable
from ..model.step import Flow, MemoryKind, layer_step, memory_kind, relative_positions
from .ds_adapter import StagedPipelineModule, count_in_grad_norm, mark_replica


@dataclass(frozen=True)
class Window:
    """Memory length and attention protocol of one mode (training or evaluation)."""

    mem_len: int
    clamp_len: int
    same_length: bool


@dataclass
class StageContext:
    """What every stage module on a rank shares (not a module: no parameters, no state dict)."""

    cfg: ModelConfig
    train: Window
    eval: Window
    activation_checkpointing: bool = False
    biases: nn.Module | None = None  # this rank's BiasStage, linked after the build
    # layer -> (sum of the mean look-ahead alpha over this step's training micro-batches, count)
    alpha_sums: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)

    def window(self, training: bool) -> Window:
        w = self.train if training else self.eval
        return Window(memory_len(self.cfg.memory, w.mem_len), w.clamp_len, w.same_length)


class ModelSource:
    """The LaMemoLM the stage modules take their submodules from; released after the build."""

    def __init__(self, model: LaMemoLM):
        self.model: LaMemoLM | None = model

    def take(self, name: str) -> nn.Module:
        if self.model is None:
            raise RuntimeError("ModelSource was released; build the PipelineModule before that")
        return self.model.get_submodule(name)

    def release(self) -> None:
        self.model = None


def _slot_state(bank: MemoryBank, slot: int, cfg: ModelConfig, *, training: bool, n_layer: int,
                batch: int, mem_len: int, like: torch.Tensor) -> MemoryState:
    """The banked state of `slot`, or an empty one (never written, or of another shape)."""
    st = bank.get(slot, training=training)
    if st is not None and st.fits(batch, mem_len):
        return st
    return empty_state(cfg.memory, batch_size=batch, mem_len=mem_len, n_layer=n_layer,
                       d_model=cfg.d_model, n_head=cfg.n_head, d_head=cfg.d_head,
                       dtype=like.dtype, device=like.device)


def pack(flow: Flow) -> torch.Tensor:
    """The flow as the one tensor that crosses a stage boundary: [B, M+N, d] (lamemo: the
    refreshed memory rows, then the current rows) or [B, N, d] (xl, none, after the last layer)."""
    return flow.cur if flow.mem is None else torch.cat([flow.mem, flow.cur], 1)


def unpack(h: torch.Tensor, kind: MemoryKind, mem_len: int) -> Flow:
    """The inverse of `pack` for the flow into a layer of memory kind `kind`."""
    return Flow(h[:, mem_len:], h[:, :mem_len]) if kind.refreshed else Flow(h)


def _one_layer_state(valid: torch.Tensor, mem_len: int, part: LayerMemory) -> MemoryState | None:
    """One layer's memory as a MemoryState of one layer (what a stage banks; None: nothing)."""
    if part.hidden is not None:  # xl
        return MemoryState(valid=valid, mem_len=mem_len, hidden=(part.hidden,))
    if part.ctx is not None:  # lamemo
        return MemoryState(valid=valid, mem_len=mem_len, ctx=(part.ctx,), lse=(part.lse,))
    return None


class IOStage(nn.Module):
    """Embedding (stage 0, with the embedding memory) and output head (last stage), tied."""

    def __init__(self, source: ModelSource, ctx: StageContext, *, first: bool):
        super().__init__()
        self.first = first  # built for the first stage (embed) or the last (head)
        self.word_emb = source.take("word_emb")
        self.crit = source.take("crit")
        self.drop = Dropout(ctx.cfg.dropout)
        self.bank = MemoryBank()
        self.ctx = ctx

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]):
        if self.first:
            return self.embed(*x)
        return self.drop(x[0])  # the last stage: (hidden [B,N,d], meta)

    def embed(self, tokens: torch.Tensor, ctrl: torch.Tensor):
        """tokens [B, N] int64; ctrl [B, 2] int64 = (slot, reset) -> (h [B, M+N, d], meta)."""
        cfg, w = self.ctx.cfg, self.ctx.window(self.training)
        kind = memory_kind(cfg.memory, w.mem_len)
        slot = int(ctrl[0, 0])
        emb = self.drop(self.word_emb(tokens))  # [B, N, d]
        st = _slot_state(self.bank, slot, cfg, training=self.training, n_layer=0,
                         batch=tokens.shape[0], mem_len=w.mem_len, like=emb)
        st = st.reset(ctrl[:, 1].bool())
        self.bank.put(slot, kind.next_state(st, emb, []), training=self.training)
        meta = torch.stack([torch.full_like(st.valid, slot), st.valid], 1)  # [B, 2]
        return pack(kind.start(emb, st)), meta


class BiasStage(nn.Module):
    """The layer-shared biases u, v, v' on one stage; activations pass through unchanged."""

    def __init__(self, source: ModelSource):
        super().__init__()
        self.biases = source.take("biases")

    def forward(self, x):
        return x


class DecoderStage(nn.Module):
    """DecoderLayer `index` with its stage-local per-slot memory."""

    def __init__(self, source: ModelSource, index: int, ctx: StageContext):
        super().__init__()
        self.layer = source.take(f"layers.{index}")
        self.index = index
        self.last = index == ctx.cfg.n_layer - 1
        self.pos_emb = SinusoidTable(ctx.cfg.d_model)
        self.drop = Dropout(ctx.cfg.dropout)
        self.bank = MemoryBank()
        self.ctx = ctx

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]):
        h, meta = x  # h [B, M+N, d] (lamemo) or [B, N, d]; meta [B, 2]
        cfg, w = self.ctx.cfg, self.ctx.window(self.training)
        m, slot, valid = w.mem_len, int(meta[0, 0]), meta[:, 1]
        kind = memory_kind(cfg.memory, m)
        flow = unpack(h, kind, m)
        st = _slot_state(self.bank, slot, cfg, training=self.training, n_layer=1,
                         batch=h.shape[0], mem_len=m, like=h)
        pos = relative_positions(kind, self.pos_emb, self.drop, variant=cfg.variant, mem_len=m,
                                 seg_len=flow.cur.shape[1], clamp_len=w.clamp_len,
                                 device=h.device, dtype=h.dtype)
        biases = self.ctx.biases() if self.ctx.biases is not None else None
        flow, part, alpha = layer_step(
            self.layer, flow, st.layer(0), pos=pos, biases=biases, valid=valid,
            same_length=w.same_length, last=self.last,
            recompute=self.ctx.activation_checkpointing and self.training)
        new = _one_layer_state(valid, m, part)
        if new is not None:
            self.bank.put(slot, new, training=self.training)
        if alpha is not None and self.training:
            total, count = self.ctx.alpha_sums.get(self.index, (0.0, 0))
            alpha = alpha.detach().double()  # stays on the device: no host sync here
            self.ctx.alpha_sums[self.index] = (alpha + total, count + 1)
        return pack(flow), meta


def stage_layout(n_layer: int, stages: int) -> list[int]:
    """Decoder layers per stage, balanced; the extra layers go to the earliest stages (the last
    stage also runs the softmax)."""
    if stages < 1 or n_layer < stages:
        raise ValueError(f"cannot split {n_layer} layers into {stages} pipeline stages: "
                         "every stage needs at least one layer (lower parallel.pipeline_stages)")
    base, extra = divmod(n_layer, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


@dataclass(frozen=True)
class LayerEntry:
    """One entry of the layer list: its kind and the LaMemoLM prefix its parameters map to."""

    kind: str  # "io", "biases" or "decoder"
    logical: str  # e.g. "layers.3" (decoder), "" (io, biases keep their own names)
    local_prefix: str  # prefix of the stage module's own state-dict keys ("layer." for decoder)


def build_specs(source: ModelSource, ctx: StageContext, stages: int):
    """(specs, parts, entries): the layer list, the stage boundaries, and the layer map."""
    cfg = ctx.cfg
    tied = _tied_names(source)
    specs, entries, parts, layer = [], [], [0], 0
    for s, count in enumerate(stage_layout(cfg.n_layer, stages)):
        if s == 0:
            specs.append(TiedLayerSpec("io", IOStage, source, ctx, first=True,
                                       tied_weight_attr=tied))
            entries.append(LayerEntry("io", "", ""))
        if not cfg.untie_r:
            specs.append(TiedLayerSpec("biases", BiasStage, source,
                                       tied_weight_attr=_param_names(source, "biases")))
            entries.append(LayerEntry("biases", "biases", "biases"))
        for _ in range(count):
            specs.append(LayerSpec(DecoderStage, source, layer, ctx))
            entries.append(LayerEntry("decoder", f"layers.{layer}", "layer"))
            layer += 1
        if s == stages - 1:
            specs.append(TiedLayerSpec("io", IOStage, source, ctx, first=False,
                                       tied_weight_attr=tied))
            entries.append(LayerEntry("io", "", ""))
        parts.append(len(specs))
    return specs, parts, entries


def _param_names(source: ModelSource, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, _ in source.take(prefix).named_parameters()]


def _tied_names(source: ModelSource) -> list[str]:
    """word_emb parameters the head uses too (tie_weight / tie_projs): the tied weights."""
    crit = {id(p) for p in source.take("crit").parameters()}
    return [f"word_emb.{n}" for n, p in source.take("word_emb").named_parameters()
            if id(p) in crit]


class LaMemoPipe(StagedPipelineModule):
    """The PipelineModule of a LaMemoLM with stage-local memory (see the module docstring)."""

    def __init__(self, model: LaMemoLM, *, stages: int, dp: int, train: Window, eval: Window,
                 activation_checkpointing: bool = False):
        if stages < 2:  # each stage builds one IOStage: the first or the last, not both
            raise ValueError(f"a pipeline needs at least 2 stages, got {stages}: train with "
                             "parallel.pipeline_stages=1 (data parallel) instead")
        self.ctx = StageContext(cfg=model.config, train=train, eval=eval,
                                activation_checkpointing=activation_checkpointing)
        source = ModelSource(model)
        specs, parts, entries = build_specs(source, self.ctx, stages)
        topo = PipeModelDataParallelTopology(num_pp=stages, num_mp=1, num_dp=dp)
        with torch.no_grad():  # the tied-weight broadcast must not enter autograd
            super().__init__(layers=specs, parts=parts, topology=topo,
                             activation_checkpoint_interval=0)
        source.release()
        self.entries = entries
        self.loss_fn = self._loss
        self.loss_hook = None  # training only: f(loss) -> loss (the trainer's fault hooks)
        if "biases" in self.tied_modules:
            self.ctx.biases = self.tied_modules["biases"].biases
        if "io" in self.tied_modules:
            self._mark_io_owners(self.tied_modules["io"])
        count_in_grad_norm(self)

    def _mark_io_owners(self, io: IOStage) -> None:
        """Count each IOStage parameter once in the global gradient norm (clipping).

        DeepSpeed marks every parameter of a tied module on the later stage as a replica; but
        only the tied weights are replicas here: word_emb belongs to stage 0 and the
        softmax-only parameters (cluster and output biases) to the last stage.
        """
        emb = {id(p) for p in io.word_emb.parameters()}
        for p in io.parameters():
            mark_replica(p, (id(p) in emb) != io.first)

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean NLL of the last stage's hidden rows [B, N, d] against targets [B, N]."""
        loss = self.tied_modules["io"].crit.nll(hidden, targets).mean()
        return self.loss_hook(loss) if self.loss_hook is not None and self.training else loss

    def materialize_tied_grads(self) -> None:
        """Zero gradients for tied weights that have none yet.

        A stage may not use every tied weight (the last layer's look-ahead bias v' feeds only
        the detached memory state), but DeepSpeed all-reduces a tied gradient only where it
        exists: the stages would issue different collectives and hang. Call before each step.
        """
        for weight, _ in self.get_tied_weights_and_groups():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)

    def take_alpha_sums(self) -> torch.Tensor:
        """[2, n_layer] float64: per layer, the summed mean alpha of the training micro-batches
        run on this rank since the last call, and their count (zeros for other stages' layers).
        Summing this over all ranks and dividing gives the mean alpha of every layer."""
        n = self.ctx.cfg.n_layer
        out = torch.zeros(2, n, dtype=torch.float64)
        for i, (total, count) in self.ctx.alpha_sums.items():
            out[0, i], out[1, i] = total.item(), count
        self.ctx.alpha_sums.clear()
        return out

    # -- memory -----------------------------------------------------------------------------
    def local_banks(self) -> dict[int, MemoryBank]:
        """Global layer-list index -> bank of every stage module on this rank that has one."""
        return {i: f.bank for i, f in self.local_layers() if isinstance(f, (IOStage, DecoderStage))}

    @property
    def memory(self) -> StageMemory:
        """This rank's stage memory as one Stateful (see StageMemory)."""
        return StageMemory(self)

    def reset_memory(self, mode: str) -> None:
        """Forget the memory of every slot of `mode` ("train" or "eval") on this rank."""
        self.memory.reset(mode)

    # -- names ------------------------------------------------------------------------------
    def layer_map(self) -> dict:
        """What checkpoint/layer_map.py writes: the stages, their boundaries, and per layer file
        index the logical (LaMemoLM) names of its parameters."""
        layers = {f"{i:02d}": {"kind": e.kind, "logical": e.logical,
                               "local_prefix": e.local_prefix, "stage": self.stage_owner(i)}
                  for i, e in enumerate(self.entries)}
        return {"pipeline_stages": self.num_stages, "parts": list(self.parts), "layers": layers}


class StageMemory:
    """The memory banks of this rank's stage modules as one Stateful: layer index -> bank."""

    def __init__(self, pipe: LaMemoPipe):
        self.banks = pipe.local_banks()
        self.device = next(pipe.parameters()).device

    def settle(self, applied: bool) -> None:
        """Keep the memory of a step that was applied; drop it when the step was skipped."""
        for bank in self.banks.values():
            bank.settle(applied)

    def reset(self, mode: str = "train") -> None:
        for bank in self.banks.values():
            bank.reset(mode)

    def state_dict(self) -> dict:
        return {idx: bank.state_dict() for idx, bank in self.banks.items()}

    def load_state_dict(self, d: dict) -> None:
        if set(d) != set(self.banks):
            raise ValueError(f"memory for layers {sorted(d)} does not match this stage's "
                             f"layers {sorted(self.banks)}")
        for idx, bank in self.banks.items():
            bank.device = self.device
            bank.load_state_dict(d[idx])
