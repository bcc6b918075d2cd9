"""The typed configuration tree.

Every section is a frozen dataclass; the string under a field is its documentation (this file
is the reference of every config key; the README's Configuration section points here). Sections
validate themselves in `validate()`, each rule in one place; values that need more than one
section are derived once in `config.derive`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MemoryKind = Literal["lamemo", "xl", "none"]
Variant = Literal["default", "signed_distance", "separate_content_bias", "unmasked_window"]
AttentionImpl = Literal["eager", "triton", "auto"]
Precision = Literal["fp32", "bf16", "fp16"]


def keeps_memory(memory: str) -> bool:
    """Whether a model of kind `memory` carries a memory between segments: 'none' never does,
    whatever a mem_len says (the one place of that rule; `memory_len` gives the length)."""
    return memory != "none"


def memory_len(memory: str, mem_len: int) -> int:
    """The memory length a model of kind `memory` really keeps: `mem_len`, or 0 for 'none'."""
    return mem_len if keeps_memory(memory) else 0


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the dotted path and the fix."""


def _check(ok: bool, path: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """What users write under `model:`."""

    vocab_size: int | Literal["auto"] = 256
    """Number of token ids (byte-level corpora: 256 + 1 for the end-of-document id). 'auto'
    takes it from the data folder's manifest.json (`lamemo train` resolves it before anything
    starts, and stores the number in the run's config.yaml). Training, `lamemo eval` and
    `lamemo generate` refuse a model whose vocab_size (or tokenizer) differs from the data's."""
    n_layer: int = 12
    """Transformer layers."""
    n_head: int = 8
    """Attention heads per layer."""
    d_model: int = 512
    """Hidden size (must be even: the sinusoid table has sin and cos halves)."""
    d_head: int = 64
    """Size of one attention head; n_head * d_head need not equal d_model."""
    d_inner: int = 2048
    """Hidden size of the position-wise feed-forward network."""
    dropout: float = 0.1
    """Dropout on embeddings, position table, attention output, FFN and the final hidden state."""
    dropatt: float = 0.0
    """Dropout on attention probabilities (the fused kernels need 0)."""
    memory: MemoryKind = "lamemo"
    """'lamemo' (look-ahead memory), 'xl' (Transformer-XL cache) or 'none' (no memory)."""
    variant: Variant = "default"
    """LaMemo ablations of the reference: signed_distance (attn_type 31), separate_content_bias
    (32), unmasked_window (33). Only with memory: lamemo."""
    segment_len: int = 512
    """Tokens per segment N (the reference's tgt_len)."""
    mem_len: int = 512
    """Memory length used in training; evaluation may use a longer one (eval.mem_len)."""
    clamp_len: int = -1
    """Clamp relative distances from above (<= 0: no clamp)."""
    same_length: bool = False
    """Every query attends to the same number of keys (Transformer-XL evaluation protocol)."""
    cutoffs: tuple[int, ...] = ()
    """Adaptive input/softmax cluster boundaries (empty: full softmax)."""
    div_val: int = 1
    """Adaptive embedding size divisor per cluster (1: all clusters use d_model)."""
    tie_weight: bool = True
    """Tie the output softmax weights to the input embedding."""
    tie_projs: bool = True
    """Tie adaptive softmax projections to the adaptive input projections."""
    pre_lnorm: bool = False
    """Pre-LayerNorm (the reference scripts use post-LN, the default)."""
    untie_r: bool = False
    """Give every layer its own position/content biases u, v, v' instead of sharing them."""
    attention_impl: AttentionImpl = "auto"
    """'eager' (reference math), 'triton' (fused kernels) or 'auto' (triton on CUDA)."""
    init_std: float = 0.02
    """Std of the normal init of weights (reference: 0.02, for its d_model 410-512 models).
    Small models learn attention far faster with about 1/sqrt(d_model): at d_model 64-128 the
    reference's 0.02 leaves copying from context unlearned for thousands of steps (see
    configs/recall.yaml and bench/RESULTS.md)."""
    proj_init_std: float = 0.01
    """Std of the normal init of adaptive projections (reference: 0.01)."""

    def validate(self, path: str = "model") -> ModelConfig:
        auto = self.vocab_size == "auto"
        names = ("n_layer", "n_head", "d_model", "d_head", "d_inner", "segment_len", "div_val")
        for name in names if auto else ("vocab_size", *names):
            _check(getattr(self, name) >= 1, f"{path}.{name}",
                   f"must be >= 1, got {getattr(self, name)}")
        _check(self.d_model % 2 == 0, f"{path}.d_model",
               f"must be even (sinusoid table), got {self.d_model}")
        _check(self.mem_len >= 0, f"{path}.mem_len", f"must be >= 0, got {self.mem_len}")
        for name in ("dropout", "dropatt"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"{path}.{name}", f"must be in [0, 1), got {v}")
        _check(self.memory == "lamemo" or self.variant == "default", f"{path}.variant",
               f"'{self.variant}' is a LaMemo ablation; set model.memory=lamemo or "
               "model.variant=default")
        prev = 0
        for c in self.cutoffs:
            _check(prev < c and (auto or c < self.vocab_size), f"{path}.cutoffs",
                   f"must be strictly increasing and below vocab_size={self.vocab_size}, "
                   f"got {list(self.cutoffs)}")
            prev = c
        _check(self.init_std > 0 and self.proj_init_std > 0, f"{path}.init_std",
               "init stds must be > 0")
        return self


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared shards are and how streams read them."""

    path: str = "data/demo"
    """Folder written by `lamemo prepare` (holds manifest.json and one folder per split)."""
    train_split: str = "train"
    """Split used for training."""
    valid_split: str = "valid"
    """Split used for periodic evaluation."""
    random_roll: bool = False
    """At each new epoch, roll every training stream by a random offset (reference training)."""
    prefetch: int = 4
    """Batches the background thread keeps ready, at least (it reads whole chunks of ~4 MiB,
    so a few more may be held)."""

    def validate(self, path: str = "data") -> DataConfig:
        _check(bool(self.path), f"{path}.path", "must name a prepared data folder")
        _check(self.prefetch >= 1, f"{path}.prefetch", f"must be >= 1, got {self.prefetch}")
        return self


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adam", "adamw"] = "adam"
    """Adam (reference) or AdamW. Fused on GPU, torch's on CPU."""
    lr: float = 2.5e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw)."""
    schedule: Literal["cosine", "constant", "linear", "inv_sqrt"] = "cosine"
    """Learning-rate schedule after warmup (reference: cosine to min_lr over train.max_steps)."""
    warmup_steps: int = 0
    """Linear warmup steps (reference: 0)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine/linear schedules."""

    def validate(self, path: str = "optim") -> OptimConfig:
        _check(self.lr > 0, f"{path}.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, f"{path}.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr <= self.lr, f"{path}.min_lr", "must be in [0, lr]")
        _check(all(0 <= b < 1 for b in self.betas), f"{path}.betas", "must be in [0, 1)")
        return self


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    micro_batch_size: int = 8
    """Streams (rows) per micro-batch on each data-parallel rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (pipeline: micro-batches per step)."""
    global_batch_size: int | None = None
    """Optional check: must equal micro_batch_size * grad_accum * dp_size."""
    max_steps: int = 1000
    """Optimizer steps."""
    seed: int = 1111
    """Seed of parameters, dropout and data order."""
    precision: Precision = "fp32"
    """fp32, bf16, or fp16 with dynamic loss scaling."""
    grad_clip: float = 0.25
    """Clip the global gradient norm (reference: 0.25; <= 0 disables)."""
    max_consecutive_skips: int = 10
    """Abort after this many consecutive steps skipped for non-finite loss or gradients."""
    activation_checkpointing: bool = False
    """Recompute each layer in backward (non-reentrant)."""
    log_interval: int = 10
    """Steps between console/TensorBoard lines."""
    eval_interval: int = 500
    """Steps between evaluations (0: only at the end)."""
    eval_max_segments: int = 0
    """Segments per stream in periodic evaluation (0: the whole split)."""
    output_dir: str = "runs/default"
    """Run folder: checkpoints/, tensorboard/, config.yaml."""
    allow_schedule_change: bool = False
    """Resume a run whose train.max_steps or optim schedule (lr, warmup_steps, schedule, min_lr)
    differs from its checkpoint's config.yaml. Off: such a resume is refused before start-up,
    naming what would change."""

    def validate(self, path: str = "train") -> TrainConfig:
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_interval",
                     "max_consecutive_skips"):
            _check(getattr(self, name) >= 1, f"{path}.{name}",
                   f"must be >= 1, got {getattr(self, name)}")
        _check(self.eval_interval >= 0, f"{path}.eval_interval", "must be >= 0")
        return self


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is spread over processes."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1, 2 or 3 (pipelines allow 0 or 1)."""
    pipeline_stages: int = 1
    """Pipeline-parallel stages P (>1 uses DeepSpeed's PipelineModule)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend (auto: nccl with CUDA, gloo otherwise)."""
    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON merged over the generated one (ours wins on conflicts)."""

    def validate(self, path: str = "parallel") -> ParallelConfig:
        _check(self.zero_stage in (0, 1, 2, 3), f"{path}.zero_stage",
               f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.pipeline_stages >= 1, f"{path}.pipeline_stages", "must be >= 1")
        _check(self.pipeline_stages == 1 or self.zero_stage <= 1, f"{path}.zero_stage",
               f"ZeRO stage {self.zero_stage} cannot be combined with pipeline_stages="
               f"{self.pipeline_stages} (DeepSpeed allows ZeRO 0 or 1 with pipelines): use "
               "zero_stage 0/1 with pipelines, or pipeline_stages=1 with ZeRO 2/3")
        return self


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol (docs/algorithm.md §6)."""

    protocol: Literal["paper", "xl"] = "paper"
    """'paper': same N and mem_len as training; 'xl': the fields below (Transformer-XL)."""
    split: str = "valid"
    """Split evaluated by `lamemo eval` by default."""
    segment_len: int | None = None
    """Evaluation segment length (None: model.segment_len)."""
    mem_len: int | None = None
    """Evaluation memory length (None: model.mem_len)."""
    clamp_len: int | None = None
    """Evaluation clamp_len (None: model.clamp_len)."""
    same_length: bool | None = None
    """Evaluation same_length (None: model.same_length)."""
    batch_size: int = 8
    """Streams per rank during evaluation."""
    memory_gain: bool = True
    """In-training evaluations also run with the memory reset before every segment and log
    the memory gain loss(reset) - loss(carried) (doubles evaluation time; skipped for
    model.memory=none, where the two are the same by construction)."""

    def validate(self, path: str = "eval") -> EvalConfig:
        _check(self.segment_len is None or self.segment_len >= 1, f"{path}.segment_len",
               "must be >= 1")
        _check(self.mem_len is None or self.mem_len >= 0, f"{path}.mem_len", "must be >= 0")
        _check(self.batch_size >= 1, f"{path}.batch_size", "must be >= 1")
        return self


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint cadence and retention."""

    interval: int = 1000
    """Steps between checkpoints (0: only at the end and on signals)."""
    keep_last: int = 3
    """Complete checkpoints kept (older ones are deleted after a new one is verified)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in train.output_dir if there is one."""

    def validate(self, path: str = "checkpoint") -> CheckpointConfig:
        _check(self.interval >= 0, f"{path}.interval", "must be >= 0")
        _check(self.keep_last >= 1, f"{path}.keep_last", "must be >= 1")
        return self


@dataclass(frozen=True)
class LogConfig:
    """Monitoring."""

    tensorboard: bool = True
    """Write TensorBoard events under train.output_dir/tensorboard (rank 0)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU (None: looked up for known GPUs, off on CPU)."""

    def validate(self, path: str = "logging") -> LogConfig:
        return self


@dataclass(frozen=True)
class RunConfig:
    """The whole tree: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> RunConfig:
        for name in ("model", "data", "optim", "train", "parallel", "eval", "checkpoint",
                     "logging"):
            getattr(self, name).validate(name)
        return self
