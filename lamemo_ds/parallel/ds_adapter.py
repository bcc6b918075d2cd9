"""Every use of DeepSpeed's private API, in one place (written against DeepSpeed 0.19.8).

DeepSpeed's PipelineModule has no public hook for fixed stage boundaries, for the layers a stage
holds or for re-broadcasting tied weights; its engine has none for measuring the gradient norm
before fp32 clipping; its parameter attributes `ds_pipe_replicated` / `model_parallel` decide
what the global gradient norm counts; and its CPU accelerator builds a kernel we never use
unless `deepspeed.ops.__compatible_ops__` says otherwise. The rest of the package goes through
the names below. `missing_private_api()` lists what an installed DeepSpeed lacks
(tests/test_ds_adapter.py fails naming it and the version), and `StagedPipelineModule` refuses
to build without them; without `__compatible_ops__` only the start-up on CPU is slower.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import deepspeed
import deepspeed.ops
import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.engine import DeepSpeedEngine

WRITTEN_AGAINST = "0.19.8"

# (class, private name): methods, or attributes its source assigns (`self.NAME =`)
PRIVATE_API: tuple[tuple[type, str], ...] = (
    (PipelineModule, "_partition_layers"),
    (PipelineModule, "_set_bounds"),
    (PipelineModule, "_synchronize_tied_weights"),
    (PipelineModule, "_topo"),
    (PipelineModule, "_local_start"),
    (PipelineModule, "forward_funcs"),
    (DeepSpeedEngine, "clip_fp32_gradients"),
)


def _has(cls: type, name: str) -> bool:
    if hasattr(cls, name):
        return True
    return f"self.{name} =" in inspect.getsource(cls)


def missing_private_api() -> list[str]:
    """'Class.name' of every private name we use that the installed DeepSpeed lacks."""
    return [f"{cls.__name__}.{name}" for cls, name in PRIVATE_API if not _has(cls, name)]


def has_compatible_ops() -> bool:
    """Whether `skip_cpu_shm_kernel` can work (without it, only start-up is slower)."""
    return isinstance(getattr(deepspeed.ops, "__compatible_ops__", None), dict)


def require_private_api() -> None:
    """Raise naming what is missing, the installed version and the one this was written for."""
    missing = missing_private_api()
    if missing:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} lacks {', '.join(missing)} (lamemo_ds/parallel/"
            f"ds_adapter.py was written against DeepSpeed {WRITTEN_AGAINST}): install that "
            "version or port the adapter")


class StagedPipelineModule(PipelineModule):
    """A PipelineModule with fixed stage boundaries `parts` and named access to what we use."""

    def __init__(self, *, layers: list, parts: list[int], topology, **kwargs):
        require_private_api()
        object.__setattr__(self, "_fixed_parts", list(parts))
        super().__init__(layers=layers, topology=topology, partition_method="lamemo", **kwargs)

    def _partition_layers(self, method: str = "lamemo") -> None:
        """DeepSpeed's partitioning hook, called by its __init__: our boundaries, not its."""
        self.parts = list(self._fixed_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def local_layers(self) -> list[tuple[int, object]]:
        """(index in the whole layer list, module or function) of every layer of this stage."""
        return [(self._local_start + i, f) for i, f in enumerate(self.forward_funcs)]

    def synchronize_tied_weights(self) -> None:
        """Broadcast every tied weight from its owner stage (after loading weights)."""
        self._synchronize_tied_weights()


def mark_replica(p: torch.nn.Parameter, replica: bool) -> None:
    """Whether DeepSpeed treats `p` as a copy of a parameter another stage owns."""
    p.ds_pipe_replicated = replica


def count_in_grad_norm(module: torch.nn.Module) -> None:
    """Make DeepSpeed's fp32 clipping count every parameter this stage owns in the global norm
    (it counts a later stage's gradient only for "model parallel" parameters)."""
    for p in module.parameters():
        p.model_parallel = not p.ds_pipe_replicated


def is_replica(p: torch.nn.Parameter) -> bool:
    return bool(p.ds_pipe_replicated)


def before_fp32_clipping(engine, fn: Callable[[], None]) -> None:
    """Run `fn` just before the engine clips fp32 gradients (its step calls the method)."""
    clip = engine.clip_fp32_gradients

    def fn_then_clip() -> None:
        fn()
        clip()

    engine.clip_fp32_gradients = fn_then_clip


def skip_cpu_shm_kernel() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce kernel.

    On the CPU accelerator, DeepSpeed's communication backend builds that C++ extension when it
    starts: about a minute of g++ on a fresh 2-core machine (and a crash where no compiler is
    installed). Only `inference_all_reduce` uses it, which training never calls, so it is marked
    unavailable for this process; GPU accelerators are left alone.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and has_compatible_ops():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
