"""Monitoring: TensorBoard scalars (rank 0), a compact console line, and metrics.jsonl.

metrics.jsonl (rank 0, in train.output_dir) gets one line per optimizer step
({"step", "loss", "skipped", "lr"}), one per log interval ({"step", "interval": {TensorBoard
scalars: means over the interval}, "alpha": [...]}), one per evaluation ({"step", "eval":
{...}}) and a last one at the end ({"step", "summary": {...}}). One history per run: a run that
starts at step S (the step of the checkpoint it resumed from, 0 for a fresh start) first drops
the lines of steps after S (atomically: lines a killed run wrote past its last checkpoint, and a
line it cut in half) and opens TensorBoard with purge_step=S+1, so the re-run steps replace the
lost ones and every step appears once. Tests compare the per-step losses of interrupted and
uninterrupted runs from this file.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch

from ..evaluation import Units
from ..fileio import atomic_write

# dense bf16 TFLOP/s of one device, for MFU when logging.peak_tflops is not given
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
               "V100": 125.0}


def peak_tflops(configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib() -> float:
    """Peak accelerator memory (GPU) or peak resident set size (CPU) of this process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_history(path: str | Path, step: int) -> int:
    """Keep the lines of metrics.jsonl `path` up to `step` (atomically); returns how many
    lines were dropped: later steps, and a last line cut short by a killed process."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, "".join(f"{line}\n" for line in kept).encode())
    return dropped


def read_losses(path: str | Path) -> dict[int, float]:
    """step -> loss from a metrics.jsonl (the last line of a step wins)."""
    out: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def segment_buckets(n: int) -> list[tuple[int, int]]:
    """[lo, hi] segment-index ranges of the per-segment eval curves: 0, 1, 2-3, 4-7, ..."""
    out, lo = [], 0
    while lo < n:
        hi = max(lo, 2 * lo - 1)
        out.append((lo, min(hi, n - 1)))
        lo = hi + 1
    return out


def bucket_losses(result) -> dict[str, float]:
    """{"seg0002-0003": token-weighted mean NLL, ...} of an EvalResult's segment buckets."""
    seg, tok = result.by_segment, result.tokens_by_segment or [1] * len(result.by_segment)
    out = {}
    for lo, hi in segment_buckets(len(seg)):
        n = sum(tok[lo:hi + 1])
        if n:
            out[f"seg{lo:04d}-{hi:04d}"] = sum(seg[i] * tok[i] for i in range(lo, hi + 1)) / n
    return out


def clock(seconds: float) -> str:
    """H:MM:SS."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Metrics:
    """Rank 0 writes; other ranks get a Metrics that does nothing (enabled=False). Nothing is
    written before `open(step)`, which the trainer calls once it knows the step it starts at.

    `units` maps a split to its evaluation.Units (from the data manifest: the tokenizer kind and
    the split's tokens and UTF-8 bytes); a split it lacks is reported per token."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool,
                 units: dict[str, Units] | None = None):
        self.enabled, self.units_of = enabled, dict(units or {})
        self.tensorboard = tensorboard
        self.evals: list[dict] = []  # this session's evaluations, for the summary
        self.out_dir = Path(out_dir)
        self.tb = None
        self.jsonl = None

    def open(self, start_step: int) -> None:
        """Start the history at `start_step`: later lines of an earlier attempt are dropped
        from metrics.jsonl and purged from TensorBoard (see the module docstring)."""
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        dropped = truncate_history(self.out_dir / "metrics.jsonl", start_step)
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} line(s) after step {start_step} (they are "
                  "trained again)", flush=True)
        self.jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.tb_dir), purge_step=start_step + 1)

    @property
    def tb_dir(self) -> Path:
        return self.out_dir / "tensorboard"

    def units(self, split: str) -> Units:
        return self.units_of.get(split, Units())

    def text(self, tag: str, body: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, f"```\n{body}\n```", 0)

    def log(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def step(self, step: int, *, loss: float, skipped: bool, lr: float) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "loss": loss, "skipped": skipped,
                                         "lr": lr}) + "\n")

    def _scalars(self, step: int, scalars: dict) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def interval(self, step: int, scalars: dict[str, float], alphas: list[float], *,
                 max_steps: int, split: str) -> None:
        """TensorBoard scalars and the console line of one log interval (means over it)."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "interval": scalars, "alpha": alphas}) + "\n")
        self._scalars(step, scalars)
        if self.tb is not None:
            for i, a in enumerate(alphas):
                self.tb.add_scalar(f"lamemo/alpha_layer{i}", a, step)
        s = scalars
        units = "".join(f" | {k} {s[f'train/{k}']:.4f}" for k in self.units(split).scores(0.0)
                        if s.get(f"train/{k}") is not None)
        print(f"step {step:>{len(str(max_steps))}}/{max_steps} | loss {s['train/loss']:.4f}"
              f"{units} | lr {s['train/lr']:.2e} | gnorm {s['train/grad_norm']:.3f} | "
              f"{_count(s['progress/tokens'])} tokens | {s['perf/target_tokens_per_s']:,.0f} "
              f"tok/s | {s['perf/tflops']:.3g} TFLOP/s | wait {100 * s['perf/data_wait_frac']:.1f}%"
              f" | skipped {int(s['train/skipped_steps'])} | elapsed "
              f"{clock(s['progress/elapsed_s'])} | ETA {clock(s['progress/eta_s'])}", flush=True)

    def eval(self, step: int, split: str, result, reset=None,
             train_seconds: float | None = None, settings: dict | None = None) -> None:
        """Log an evaluation; `reset` (the same split with memory reset before every segment)
        adds the memory gain (eval/<split>_memory_gain_bits_per_token) and, on a recall corpus,
        the bits per key symbol of both passes; `settings` (protocol and lengths) go into the
        JSON record. The loss by segment index goes to TensorBoard
        as one curve per segment bucket (eval_by_segment/<split>_segLO-HI) over training
        steps."""
        units = self.units(split)
        self.evals.append({"step": step, "split": split, "loss": result.loss,
                           "scores": units.scores(result.loss)})
        if not self.enabled:
            return
        from ..evaluation import describe, memory_gain

        record = dict(result.as_dict(units), split=split, **(settings or {}))
        if units.bytes_note:
            record["bits_per_byte_note"] = units.bytes_note
        if train_seconds is not None:
            record["train_seconds"] = round(train_seconds, 3)
        scalars = {f"eval/{split}_loss": result.loss,
                   f"eval/{split}_recall_bits": result.subset_bits}
        scalars.update({f"eval/{split}_{k}": v for k, v in units.scores(result.loss).items()})
        if reset is not None:
            gain = memory_gain(result, reset)
            record.update(gain, reset=reset.as_dict(units))
            scalars.update({
                f"eval/{split}_memory_gain_bits_per_token": gain["memory_gain_bits_per_token"],
                f"eval/{split}_memory_ppl_ratio": gain["memory_ppl_ratio"],
                f"eval/{split}_recall_bits_reset": reset.subset_bits})
        for name, r in (("", result), ("_reset", reset)):
            if r is not None:
                scalars.update({f"eval_by_segment/{split}{name}_{k}": v
                                for k, v in bucket_losses(r).items()})
        self._scalars(step, scalars)
        if self.tb is not None:
            self.tb.flush()
        self.jsonl.write(json.dumps({"step": step, "eval": record}) + "\n")
        seg = result.by_segment
        tail = f" | segment 0 {seg[0]:.4f} -> last {seg[-1]:.4f}" if len(seg) > 1 else ""
        if reset is not None:
            tail += f" | memory gain {gain['memory_gain_bits_per_token']:+.4f} bits/token"
        if result.subset_bits is not None:
            tail += f" | recall {result.subset_bits:.3f} bits/symbol"
            if reset is not None:
                tail += f" (reset {reset.subset_bits:.3f})"
        print(f"eval  {step:>7} | {split} {describe(result, units)}{tail}", flush=True)

    def eval_progress(self, step: int, split: str, mode: str, every_s: float = 10.0):
        """A callback(done, total) printing where an evaluation pass is, every `every_s`
        seconds (and at its end when it printed before): a long evaluation is not silent."""
        t0 = last = time.perf_counter()

        def tick(done: int, total: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last >= every_s or (done == total and last > t0):
                last = now
                self.log(f"eval  {step:>7} | {split} ({mode} memory) segment {done}/{total} | "
                         f"{now - t0:.1f}s, ETA {clock((now - t0) * (total - done) / done)}")
        return tick

    def summary(self, *, step: int, tokens: int, train_seconds: float) -> None:
        """The one-line summary at the end of a run: the best and last evaluation of this
        session, tokens and training time (and a {"summary": ...} line in metrics.jsonl)."""
        if not self.enabled:
            return
        best = min(self.evals, key=lambda e: e["loss"]) if self.evals else None
        record = {"step": step, "tokens": tokens, "train_seconds": train_seconds,
                  "best_eval": best, "last_eval": self.evals[-1] if self.evals else None}
        self.jsonl.write(json.dumps({"step": step, "summary": record}) + "\n")
        parts = [f"done: step {record['step']}", f"{_count(record['tokens'])} tokens",
                 f"{clock(record['train_seconds'])} training"]
        for name in ("best", "last"):
            e = record.get(f"{name}_eval")
            if e is not None:
                score = ", ".join(f"{k} {v:.4f}" for k, v in e["scores"].items()
                                  if v is not None)
                parts.append(f"{name} eval {e['split']} loss {e['loss']:.4f} ({score}) at "
                             f"step {e['step']}")
        print(" | ".join(parts), flush=True)

    def flush(self) -> None:
        """Make the history so far durable (called before each checkpoint, so a killed run
        loses no step that its checkpoint covers)."""
        if self.tb is not None:
            self.tb.flush()
        if self.jsonl is not None:
            self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _count(n: float) -> str:
    """12.3M, 4.56K, 789."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"


class Interval:
    """Accumulates one log interval: token-weighted loss, grad norm, step times, data waits,
    mean alpha per layer. Skipped steps (non-finite) are left out of the means."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.wait = 0.0
        self.loss_sum = self.loss_tokens = 0.0
        self.norm_sum, self.norm_n = 0.0, 0
        self.alphas: list[list[float]] = []

    def add(self, r, *, tokens: int) -> None:
        """One optimizer step's StepResult, which trained on `tokens` target tokens."""
        self.steps += 1
        self.wait += r.wait_s
        if not r.skipped and math.isfinite(r.loss):
            self.loss_sum += r.loss * tokens
            self.loss_tokens += tokens
        if not r.skipped and math.isfinite(r.grad_norm):
            self.norm_sum += r.grad_norm
            self.norm_n += 1
        if r.alphas:
            self.alphas.append(r.alphas)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.loss_tokens if self.loss_tokens else float("nan")

    @property
    def grad_norm(self) -> float:
        return self.norm_sum / self.norm_n if self.norm_n else float("nan")

    def mean_alphas(self) -> list[float]:
        return [sum(col) / len(col) for col in zip(*self.alphas)] if self.alphas else []

    def summary(self, *, tokens_per_step: int, flops_per_token: float, world_size: int,
                peak: float | None) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = tokens_per_step * self.steps / dt
        tflops = tps * flops_per_token / 1e12 / world_size  # per device
        return {"perf/target_tokens_per_s": tps, "perf/step_time_s": dt / max(self.steps, 1),
                "perf/tflops": tflops, "perf/mfu": tflops / peak if peak else None,
                "perf/data_wait_frac": self.wait / dt, "perf/peak_memory_gib": peak_memory_gib()}
