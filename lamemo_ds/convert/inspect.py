"""What a checkpoint or model folder holds, read from its files without building a model.

`inspect_path` takes what `lamemo convert` takes: a run folder, its checkpoints/, one step-N/
folder (DeepSpeed files), or a consolidated / hf / reference folder. It reports the step, the
layout (ZeRO stage, world size, pipeline map), the tensors (names, shapes, dtypes) and whether the
files match the manifest; `lamemo inspect` and tools/inspect_checkpoint.py print it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import deepspeed_files as dsio
from ..checkpoint.layer_map import layer_files, read_layer_map, rename_keys
from ..checkpoint.manager import MANIFEST, CheckpointError, locate, verify
from ..checkpoint.safe_load import load_pt
from . import consolidated
from .loaded import EVAL_NAME
from .reference import REFERENCE_NAME
from .registry import detect_format


def _tensor(t) -> dict:
    shape = list(t.shape) if hasattr(t, "shape") else list(t)
    return {"shape": shape, "dtype": str(getattr(t, "dtype", "")).removeprefix("torch.") or None}


def _manifest(step: Path, check: bool) -> dict:
    path = step / MANIFEST
    if not path.is_file():
        return {"present": False, "check": "no manifest.json (not a complete `lamemo train` "
                "checkpoint)"}
    data = json.loads(path.read_text())
    files = data.get("files", {})
    out = {"present": True, "files": len(files),
           "bytes": sum(f["bytes"] for f in files.values())}
    if check:
        reason = verify(step)
        out["check"] = "ok: every file matches its size and sha256" if reason is None else reason
        out["ok"] = reason is None
    else:
        out["check"] = "not checked (--no-verify)"
    return out


def _pipeline(ds: Path, record: dict) -> tuple[dict, dict]:
    """(pipeline map, logical tensors) of a pipeline-layout DeepSpeed folder."""
    layers, tensors, io = record["layers"], {}, []
    rows = []
    for key, e in layers.items():
        files = layer_files(ds, key)
        rows.append({"file": Path(files[0]).name if files else f"layer_{key}-* (MISSING)",
                     "kind": e["kind"], "logical": e["logical"] or e["kind"],
                     "stage": e["stage"]})
        if not files:
            continue
        sd = load_pt(files[0])
        if e["kind"] == "io":
            io.append(key)
            sd = {k: v for k, v in sd.items() if k.startswith("word_emb." if len(io) == 1
                                                                  else "crit.")}
        sd = rename_keys(sd, local_prefix=e["local_prefix"], logical=e["logical"])
        tensors.update({k: _tensor(v) for k, v in sd.items()})
    return {"pipeline_stages": record["pipeline_stages"], "parts": record["parts"],
            "layers": rows}, tensors


def _data_parallel(ds: Path) -> tuple[dict, dict]:
    """(ZeRO stage, DeepSpeed world size, files; tensors) of a data-parallel DeepSpeed folder."""
    info = dsio.inspect(ds)
    states = info["states"]
    module = states.get("module") or {}
    if module and not info["masters"]:
        tensors = {k: _tensor(v) for k, v in module.items()}
    else:  # ZeRO: names and shapes as DeepSpeed records them (the weights are partitioned)
        tensors = {k: {"shape": list(v), "dtype": "float32 (fp32 master)"}
                   for group in states.get("param_shapes") or [] for k, v in group.items()}
    layout = {"zero_stage": info["zero_stage"], "world_size": info["world_size"],
              "files": [f.name for f in info["files"]]}
    return layout, tensors


def inspect_step(step: Path, *, check: bool = True) -> dict:
    """A `lamemo train` (or bare DeepSpeed) step folder."""
    meta = json.loads((step / "meta.json").read_text()) if (step / "meta.json").is_file() else {}
    ds = dsio.ds_folder(step)
    record = read_layer_map(ds)
    try:
        if record is not None:
            layout, tensors = _pipeline(ds, record)
            layout["zero_stage"] = meta.get("zero_stage")
        else:
            layout, tensors = _data_parallel(ds)
    except (CheckpointError, OSError, RuntimeError) as e:  # report what can be read
        layout = {"zero_stage": meta.get("zero_stage"), "world_size": meta.get("world_size"),
                  "error": str(e)}
        tensors = {}
    ranks = sorted(p.name for p in (step / "lamemo").glob("rank-*.pt"))
    progress = None
    if ranks:
        saved = load_pt(step / "lamemo" / ranks[0])
        progress = saved.get("progress")
    model = None
    try:
        model = dsio.find_run_config(step).model
    except Exception:  # no config beside it: the report says so
        pass
    return {"format": "deepspeed", "path": str(step), "step": meta.get("step"), "meta": meta,
            "layout": layout, "training_state": {"rank_files": len(ranks), "progress": progress},
            "model": None if model is None else {k: getattr(model, k) for k in (
                "memory", "n_layer", "d_model", "n_head", "d_head", "vocab_size", "mem_len")},
            "manifest": _manifest(step, check), "tensors": tensors}


def inspect_folder(path: Path) -> dict:
    """A consolidated, hf or reference folder (tensor shapes from the file headers)."""
    from safetensors import safe_open

    fmt = detect_format(path)
    if fmt == "reference":
        sd = load_pt(path / REFERENCE_NAME)
        tensors = {k: _tensor(v) for k, v in sd.items()}
    else:
        index = path / consolidated.INDEX_NAME
        names = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
                 if index.is_file() else [consolidated.WEIGHTS_NAME])
        tensors = {}
        for name in names:
            if not (path / name).is_file():
                tensors[f"<missing file {name}>"] = {"shape": [], "dtype": None}
                continue
            with safe_open(str(path / name), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    tensors[k] = {"shape": list(sl.get_shape()), "dtype": sl.get_dtype()}
    cfg, data = consolidated.read_model_config(path)
    evals = json.loads((path / EVAL_NAME).read_text()) if (path / EVAL_NAME).is_file() else None
    return {"format": fmt, "path": str(path), "step": None, "meta": {},
            "layout": {"files": sorted(p.name for p in path.iterdir() if p.is_file())},
            "model": {k: getattr(cfg, k) for k in ("memory", "n_layer", "d_model", "n_head",
                                                   "d_head", "vocab_size", "mem_len")},
            "dtype": data.get("dtype"), "eval": evals, "tensors": tensors}


def inspect_path(path: str | Path, *, check: bool = True, log=lambda msg: None) -> dict:
    """Inspect whatever `path` is (see the module docstring)."""
    path = Path(path)
    if detect_format(path) != "deepspeed":
        return inspect_folder(path)
    step = locate(path, log)
    out = inspect_step(step, check=check and step == path)
    if step != path:  # locate verified the newest complete checkpoint of a run
        out["manifest"]["check"] = "ok: every file matches its size and sha256"
        out["manifest"]["ok"] = True
        out["located"] = f"newest complete checkpoint under {path}"
    return out


def describe(report: dict, *, tensors: bool = False) -> str:
    """The report as text (what `lamemo inspect` prints)."""
    lines = [f"{report['format']}: {report['path']}"]
    if report.get("located"):
        lines.append(f"  ({report['located']})")
    if report.get("step") is not None:
        lines.append(f"step        : {report['step']}")
    meta, lay = report.get("meta") or {}, report.get("layout") or {}
    if report["format"] == "deepspeed":
        lines.append(f"layout      : ZeRO {lay.get('zero_stage')}, world size "
                     f"{meta.get('world_size', lay.get('world_size'))}, data-parallel "
                     f"{meta.get('dp_size', lay.get('world_size'))}, pipeline stages "
                     f"{lay.get('pipeline_stages', 1)}, micro-batch {meta.get('micro_batch')} x "
                     f"accumulation {meta.get('grad_accum')}, {meta.get('precision', '?')}")
        if "layers" in lay:
            lines.append(f"pipeline    : parts {lay['parts']}")
            lines += [f"  {r['file']:<36} stage {r['stage']}  {r['kind']:<8} {r['logical']}"
                      for r in lay["layers"]]
        elif "files" in lay:
            lines.append(f"files       : {len(lay['files'])} DeepSpeed file(s)")
        if "error" in lay:
            lines.append(f"files       : UNREADABLE: {lay['error']}")
        ts = report["training_state"]
        prog = ts["progress"] or {}
        lines.append(f"train state : {ts['rank_files']} rank file(s)"
                     + (f", {prog.get('skipped_total', 0)} step(s) skipped" if prog else ""))
        if meta.get("converted_by"):
            lines.append(f"written by  : {meta['converted_by']}")
        lines.append(f"manifest    : {report['manifest']['check']}")
    else:
        lines.append(f"files       : {', '.join(lay['files'])}")
        if report.get("dtype"):
            lines.append(f"dtype       : {report['dtype']}")
        if report.get("eval"):
            lines.append(f"eval        : {', '.join(report['eval'])}")
    if report.get("model"):
        lines.append("model       : " + ", ".join(f"{k} {v}" for k, v in report["model"].items()))
    else:
        lines.append("model       : no training config found beside it")
    ts = report["tensors"]
    count = sum(_numel(t["shape"]) for t in ts.values())
    lines.append(f"tensors     : {len(ts)} ({count:,} values)")
    if tensors:
        lines += [f"  {k:<48} {str(tuple(t['shape'])):<18} {t['dtype']}" for k, t in ts.items()]
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
