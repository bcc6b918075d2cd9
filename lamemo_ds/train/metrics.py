"""Monitoring: TensorBoard scalars (rank 0), a compact console line, and metrics.jsonl.

metrics.jsonl (rank 0, in train.output_dir) gets one line per optimizer step
({"step", "loss", "skipped", "lr"}), one per log interval ({"step", "interval": {TensorBoard
scalars}, "alpha": [...]}) and one per evaluation ({"step", "eval": {...}}). One history per
run: a run that starts at step S (the step of the checkpoint it resumed from, 0 for a fresh start)
first drops the lines of steps after S (atomically: lines a killed run wrote past its last
checkpoint, and a line it cut in half) and opens TensorBoard with purge_step=S+1, so the re-run
steps replace the lost ones and every step appears once. Tests compare the per-step losses of
interrupted and uninterrupted runs from this file.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch

from ..checkpoint.manager import atomic_write_bytes

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
        atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())
    return dropped


def read_losses(path: str | Path) -> dict[int, float]:
    """step -> loss from a metrics.jsonl (the last line of a step wins)."""
    out: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


class Metrics:
    """Rank 0 writes; other ranks get a Metrics that does nothing (enabled=False). Nothing is
    written before `open(step)`, which the trainer calls once it knows the step it starts at."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool, unit: str):
        """unit: 'bpc' for byte/char vocabularies, 'ppl' for words."""
        self.enabled, self.unit, self.tensorboard = enabled, unit, tensorboard
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

    def score(self, loss: float) -> float:
        """ppl = exp(loss) or bpc = loss / ln 2 (docs/algorithm.md §6)."""
        return loss / math.log(2) if self.unit == "bpc" else math.exp(min(loss, 700.0))

    def text(self, tag: str, body: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, f"```\n{body}\n```", 0)

    def step(self, step: int, *, loss: float, skipped: bool, lr: float) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "loss": loss, "skipped": skipped,
                                         "lr": lr}) + "\n")

    def interval(self, step: int, scalars: dict[str, float], alphas: list[float]) -> None:
        """TensorBoard scalars and the console line of one log interval."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "interval": scalars, "alpha": alphas}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            for i, a in enumerate(alphas):
                self.tb.add_scalar(f"lamemo/alpha_layer{i}", a, step)
        s = scalars
        print(f"step {step:>7} | loss {s['train/loss']:.4f} | {self.unit} "
              f"{s[f'train/{self.unit}']:.3f} | lr {s['train/lr']:.2e} | gnorm "
              f"{s['train/grad_norm']:.3f} | {s['perf/target_tokens_per_s']:,.0f} tok/s | "
              f"{s['perf/tflops']:.3g} TFLOP/s | wait {100 * s['perf/data_wait_frac']:.1f}% | "
              f"skipped {int(s['train/skipped_steps'])}", flush=True)

    def eval(self, step: int, split: str, result, reset=None,
             train_seconds: float | None = None) -> None:
        """Log an evaluation; `reset` (the same split with memory reset before every segment)
        adds the memory gain (eval/<split>_memory_gain_bpc) and, on a recall corpus, the bits
        per key symbol of both passes."""
        if not self.enabled:
            return
        from ..evaluation import memory_gain

        score = self.score(result.loss)
        record = dict(result.as_dict(), split=split)
        if train_seconds is not None:
            record["train_seconds"] = round(train_seconds, 3)
        scalars = {f"eval/{split}_loss": result.loss, f"eval/{split}_{self.unit}": score,
                   f"eval/{split}_recall_bits": result.subset_bits}
        if reset is not None:
            gain = memory_gain(result, reset)
            record.update(gain, reset=reset.as_dict())
            scalars.update({f"eval/{split}_memory_gain_bpc": gain["memory_gain_bpc"],
                            f"eval/{split}_memory_ppl_ratio": gain["memory_ppl_ratio"],
                            f"eval/{split}_recall_bits_reset": reset.subset_bits})
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
            for i, v in enumerate(result.by_segment):
                self.tb.add_scalar(f"eval/{split}_loss_by_segment", v, i)
            if reset is not None:
                for i, v in enumerate(reset.by_segment):
                    self.tb.add_scalar(f"eval/{split}_loss_by_segment_reset", v, i)
            self.tb.flush()
        self.jsonl.write(json.dumps({"step": step, "eval": record}) + "\n")
        seg = result.by_segment
        tail = f" | segment 0 {seg[0]:.4f} -> last {seg[-1]:.4f}" if len(seg) > 1 else ""
        if reset is not None:
            tail += f" | memory gain {record['memory_gain_bpc']:+.4f} bpc"
        if result.subset_bits is not None:
            tail += f" | recall {result.subset_bits:.3f} bits/symbol"
            if reset is not None:
                tail += f" (reset {reset.subset_bits:.3f})"
        print(f"eval  {step:>7} | {split} loss {result.loss:.4f} | {self.unit} {score:.4f} | "
              f"{result.tokens:,} tokens{tail}", flush=True)

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


class Throughput:
    """Accumulates step times and data waits between log intervals."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.wait = 0.0

    def summary(self, *, tokens_per_step: int, flops_per_token: float, world_size: int,
                peak: float | None) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = tokens_per_step * self.steps / dt
        tflops = tps * flops_per_token / 1e12 / world_size  # per device
        return {"perf/target_tokens_per_s": tps, "perf/step_time_s": dt / max(self.steps, 1),
                "perf/tflops": tflops, "perf/mfu": tflops / peak if peak else None,
                "perf/data_wait_frac": self.wait / dt, "perf/peak_memory_gib": peak_memory_gib()}
