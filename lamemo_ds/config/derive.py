"""Values that need more than one config section, derived once: resolve(cfg, world) -> Plan.

A pure function (no torch, no environment): `lamemo plan` can print what a job will do on any
machine, and the trainer fails before any process group starts when the numbers disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .schema import ConfigError, EvalConfig, ModelConfig, RunConfig, memory_len


@dataclass(frozen=True)
class World:
    """What the launcher gives us: processes and whether they have GPUs."""

    world_size: int = 1
    cuda: bool = False


@dataclass(frozen=True)
class EvalPlan:
    """The evaluation protocol after defaults are filled in (docs/algorithm.md §6)."""

    protocol: str
    segment_len: int
    mem_len: int
    clamp_len: int
    same_length: bool
    batch_size: int


@dataclass(frozen=True)
class Plan:
    """How one optimizer step is made.

    Every rank owns `rows_per_rank` = micro_batch × grad_accum streams; micro-batch m of every
    step carries the same `micro_batch` streams (slot m), so each stream advances one segment
    per optimizer step and its memory always continues its own text.
    """

    world_size: int
    dp_size: int
    pp_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int  # streams per optimizer step = micro × accum × dp
    seg_len: int
    tokens_per_step: int  # target tokens per optimizer step
    backend: str
    precision: str
    zero_stage: int
    eval: EvalPlan

    @property
    def rows_per_rank(self) -> int:
        return self.micro_batch * self.grad_accum

    def describe(self) -> str:
        return (f"world {self.world_size} = dp {self.dp_size} × pp {self.pp_size}; batch "
                f"{self.global_batch} streams = micro {self.micro_batch} × accum "
                f"{self.grad_accum} × dp {self.dp_size}; {self.tokens_per_step} target "
                f"tokens/step; ZeRO {self.zero_stage}, {self.precision}, {self.backend}")


def eval_plan(model: ModelConfig, ev: EvalConfig | None, *, protocol: str | None = None,
              segment_len: int | None = None, mem_len: int | None = None,
              clamp_len: int | None = None, same_length: bool | None = None,
              batch_size: int | None = None) -> EvalPlan:
    """The one protocol derivation, for training and `lamemo eval` (docs/algorithm.md §6).

    Starts from the run's `eval` section (`ev`; None: the paper protocol); `protocol` picks
    another; the length arguments override either and name the protocol `xl` (lengths other
    than training's). Unset xl fields are the model's. A `none` model keeps no memory."""
    protocol = protocol or (ev.protocol if ev is not None else "paper")
    base = ev if ev is not None else EvalConfig()
    given = {"segment_len": segment_len, "mem_len": mem_len, "clamp_len": clamp_len,
             "same_length": same_length}
    if any(v is not None for v in given.values()):
        protocol = "xl"
    xl = protocol == "xl"

    def pick(name: str):
        if given[name] is not None:
            return given[name]
        stored = getattr(base, name) if xl else None
        return getattr(model, name) if stored is None else stored

    mem = memory_len(model.memory, pick("mem_len"))
    size = batch_size if batch_size is not None else (ev.batch_size if ev else 8)
    return EvalPlan(protocol, pick("segment_len"), mem, pick("clamp_len"),
                    pick("same_length"), size)


def _eval_plan(cfg: RunConfig) -> EvalPlan:
    return eval_plan(cfg.model, cfg.eval)


def with_data_vocab(cfg: RunConfig, data_vocab: int) -> RunConfig:
    """`cfg` with model.vocab_size 'auto' replaced by the data's vocabulary size (the number in
    the data folder's manifest); a number is kept as it is (the contract check compares it)."""
    if cfg.model.vocab_size != "auto":
        return cfg
    return replace(cfg, model=replace(cfg.model, vocab_size=int(data_vocab))).validate()


def resolve(cfg: RunConfig, world: World) -> Plan:
    """Check every cross-section rule and derive the step plan; raises ConfigError naming keys.

    The sections' own rules (e.g. ZeRO 2/3 cannot run with pipelines, ParallelConfig.validate)
    are checked first, so a config built in code passes the same checks as a loaded one."""
    cfg.validate()
    t, p = cfg.train, cfg.parallel
    if world.world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world.world_size}")
    if p.pipeline_stages > cfg.model.n_layer:
        raise ConfigError(
            f"parallel.pipeline_stages={p.pipeline_stages} exceeds model.n_layer="
            f"{cfg.model.n_layer}: every stage needs at least one layer")
    if world.world_size % p.pipeline_stages:
        raise ConfigError(f"parallel.pipeline_stages={p.pipeline_stages} does not divide the "
                          f"world size {world.world_size}")
    dp = world.world_size // p.pipeline_stages
    global_batch = t.micro_batch_size * t.grad_accum * dp
    if t.global_batch_size is not None and t.global_batch_size != global_batch:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} but train.micro_batch_size="
            f"{t.micro_batch_size} × train.grad_accum={t.grad_accum} × data-parallel size {dp} "
            f"(world {world.world_size} / parallel.pipeline_stages {p.pipeline_stages}) = "
            f"{global_batch}; change one of them or drop train.global_batch_size")
    backend = p.backend if p.backend != "auto" else ("nccl" if world.cuda else "gloo")
    if backend == "nccl" and not world.cuda:
        raise ConfigError("parallel.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    if t.precision == "fp16" and not world.cuda:
        raise ConfigError("train.precision: fp16 needs a GPU (CPU kernels lack half precision "
                          "support); use bf16 or fp32 on CPU")
    ev = _eval_plan(cfg)
    if ev.mem_len < 0:  # 0 already for memory none (memory_len)
        raise ConfigError(f"eval.mem_len must be >= 0, got {ev.mem_len}")
    return Plan(world_size=world.world_size, dp_size=dp, pp_size=p.pipeline_stages,
                micro_batch=t.micro_batch_size, grad_accum=t.grad_accum,
                global_batch=global_batch, seg_len=cfg.model.segment_len,
                tokens_per_step=global_batch * cfg.model.segment_len, backend=backend,
                precision=t.precision, zero_stage=p.zero_stage, eval=ev)
