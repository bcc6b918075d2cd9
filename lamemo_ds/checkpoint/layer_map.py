"""layer_map.json: how a pipeline checkpoint's layer files map onto the LaMemoLM's names.

DeepSpeed writes one file per entry of the pipeline's layer list (layer_NN-model_00-...pt) with
the stage module's own parameter names. Beside them `lamemo train` writes layer_map.json:

    {"pipeline_stages": P, "parts": [stage boundaries],
     "layers": {"NN": {"kind": "io" | "biases" | "decoder", "logical": "layers.3",
                       "local_prefix": "layer", "stage": s}, ...}}

A stage module's key `local_prefix.rest` is the model's `logical.rest` (io and biases keep their
own names). The same rule renames in both directions: reading a checkpoint of any layout into
one model (`logical_state_dict`), and loading a model's weights into stage modules
(parallel.pipeline_engine.load_logical).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch

from .safe_load import load_pt

LAYER_MAP = "layer_map.json"
MODEL_STATES = "mp_rank_00_model_states.pt"  # a data-parallel checkpoint's module (ZeRO 0-2)


def rename_keys(sd: dict, *, local_prefix: str, logical: str) -> dict:
    """A stage module's keys (under `local_prefix`) as the model's (under `logical`)."""
    if not local_prefix:
        return dict(sd)
    cut = len(local_prefix) + 1
    return {f"{logical}.{k[cut:]}": v for k, v in sd.items()}


def write_layer_map(ds_dir: str | Path, record: dict) -> Path:
    """Write `record` ({"pipeline_stages", "parts", "layers"}) beside the layer files."""
    path = Path(ds_dir) / LAYER_MAP
    path.write_text(json.dumps(record, indent=1))
    return path


def read_layer_map(ds_dir: str | Path) -> dict | None:
    """The layer map of a DeepSpeed folder, or None (a data-parallel checkpoint has none)."""
    path = Path(ds_dir) / LAYER_MAP
    return json.loads(path.read_text()) if path.is_file() else None


def layer_files(ds_dir: str | Path, key: str) -> list[str]:
    return sorted(glob.glob(str(Path(ds_dir) / f"layer_{key}-*model_states.pt")))


def logical_state_dict(ds_dir: str | Path) -> dict[str, torch.Tensor]:
    """The LaMemoLM state dict from a DeepSpeed checkpoint folder of either layout.

    Pipeline layout: every layer file renamed through layer_map.json (word_emb from the first
    stage's IOStage, crit from the last one's). Data-parallel layout: mp_rank_00's "module".
    """
    ds_dir = Path(ds_dir)
    record = read_layer_map(ds_dir)
    if record is None:
        if not (ds_dir / MODEL_STATES).is_file():
            raise FileNotFoundError(f"{ds_dir}: neither {LAYER_MAP} nor {MODEL_STATES}; not "
                                    "a lamemo checkpoint")
        return load_pt(ds_dir / MODEL_STATES)["module"]
    layers = record["layers"]
    io = [k for k, e in layers.items() if e["kind"] == "io"]
    out: dict[str, torch.Tensor] = {}
    for key, e in layers.items():
        files = layer_files(ds_dir, key)
        if not files:
            raise FileNotFoundError(f"{ds_dir}: layer file layer_{key}-*model_states.pt missing")
        sd = load_pt(files[0])
        if e["kind"] == "io":
            keep = "word_emb." if key == io[0] else "crit."
            sd = {k: v for k, v in sd.items() if k.startswith(keep)}
        out.update(rename_keys(sd, local_prefix=e["local_prefix"], logical=e["logical"]))
    return out
