"""The DeepSpeed JSON config, produced here and nowhere else.

`deepspeed_config(cfg, plan)` maps our typed sections onto DeepSpeed's keys. A user may point
`parallel.deepspeed_config` at a JSON file with extra DeepSpeed settings (bucket sizes, offload,
communication dtype...); it is merged under ours: on a key both set, ours wins, because the
trainer relies on those values (batch sizes, precision, clipping, ZeRO stage).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .derive import Plan
from .schema import ConfigError, RunConfig


def _ours(cfg: RunConfig, plan: Plan) -> dict[str, Any]:
    t = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": t.grad_clip if t.grad_clip > 0 else 0.0,
        "steps_per_print": 2**31 - 1,  # our metrics module logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": plan.zero_stage},
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16"},
    }
    if plan.precision == "fp16":
        # loss_scale 0 = dynamic: start at 2^16, halve on overflow, double after 1000 clean steps
        ds["fp16"].update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000,
                          hysteresis=2, min_loss_scale=1)
    if plan.zero_stage == 3:
        # gather tied / small parameters eagerly enough for a recurrent model that runs one
        # forward per micro-batch; the defaults are tuned for much larger models
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0,
                                       stage3_gather_16bit_weights_on_model_save=True)
    return ds


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: values of `over` win; neither input is modified."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_user_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"parallel.deepspeed_config: {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config: {p} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config: {p} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise ConfigError(f"parallel.deepspeed_config: {p} sets '{key}'; the optimizer and "
                              "schedule come from the optim: section, remove it from the JSON")
    return data


def deepspeed_config(cfg: RunConfig, plan: Plan, user: dict | None = None) -> dict:
    """Our DeepSpeed config, merged over the user's extra JSON (ours wins)."""
    if user is None and cfg.parallel.deepspeed_config:
        user = load_user_json(cfg.parallel.deepspeed_config)
    return merge(user or {}, _ours(cfg, plan))
