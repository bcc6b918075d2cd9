"""Pipeline parallelism trains the same model as the data-parallel engine (CPU, gloo).

Each layout starts tests/pipeline_runner.py ranks: the reference (one process, the DeepSpeed
data-parallel engine, every stream) and the pipeline (P stages x DP replicas) from the same
seeded weights and data, with memory carried over 5 steps and gradient clipping active; one
launch per layout runs several cases in turn.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("pipeline_runner.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, nproc: int, *args: str, timeout: float = 150) -> list[list[dict]]:
    """Run `nproc` ranks of the runner; return each rank's result dicts (one per --case)."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(_port())
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK=str(rank),
                   WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, str(RUNNER), "--out", str(out), "--watchdog", str(timeout - 10),
             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(nproc)]


def assert_same_training(ref: dict, ranks: list[dict]) -> None:
    """Per-step losses within 1e-5; every parameter's step-1 gradient on its owning stage."""
    for r in ranks:
        assert len(r["losses"]) == len(ref["losses"]) == 5
        for step, (a, b) in enumerate(zip(ref["losses"], r["losses"])):
            assert abs(a - b) < 1e-5, f"step {step + 1}: loss {b} vs reference {a}"
    if ref["alphas"] and ref["alphas"][0]:  # lamemo: every layer's mean alpha, per step
        summed = sum(torch.stack(r["alpha_sums"]) for r in ranks)  # [steps, 2, n_layer]
        assert bool((summed[:, 1] > 0).all()), "a layer reported no alpha"
        got = (summed[:, 0] / summed[:, 1]).tolist()
        for step, (a, b) in enumerate(zip(ref["alphas"], got)):
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, f"step {step + 1}: {b} vs {a}"
    seen = set()
    for r in ranks:
        for name in r["owned"]:  # a stage's unused copies of the other stage's io parameters
            g = r["grads"][name]  # are skipped; tied weights are owned by the first stage
            torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-7,
                                       msg=lambda m, n=name: f"gradient of {n}: {m}")
            seen.add(name)
    assert seen == set(ref["grads"]), f"no gradient for {set(ref['grads']) - seen}"


# name -> runner options; one launch per layout runs them all in turn (start-up is most of the
# cost). Each case builds its own seeded model and engine; checkpointing is set per module.
CASES = {"plain": "", "xl-adaptive": "--memory xl --adaptive", "act-ckpt": "--ckpt"}


@pytest.fixture(scope="module")
def p2_vs_p1(tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    """case -> (the P=1 reference's result, each P=2 rank's result), 5 steps each."""
    root = tmp_path_factory.mktemp("pipe")
    cases = [f"--case={opts}" for opts in CASES.values()]
    (ref,) = launch(root / "p1", 1, *cases, timeout=240)
    ranks = launch(root / "p2", 2, "--stages", "2", *cases, timeout=240)
    return {name: (ref[i], [r[i] for r in ranks]) for i, name in enumerate(CASES)}


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["plain", "act-ckpt"])
def test_p2_equals_p1(p2_vs_p1, case):
    ref, ranks = p2_vs_p1[case]
    assert_same_training(ref, ranks)
    # tied weights (embedding = softmax weight, u/v/v') identical on both stages after 5 steps
    torch.testing.assert_close(ranks[0]["tied"]["word_emb"], ranks[1]["tied"]["word_emb"],
                               rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["tied"]["biases"], ranks[1]["tied"]["biases"],
                               rtol=0, atol=0)


@pytest.mark.distributed
def test_p2_equals_p1_xl_adaptive(p2_vs_p1):
    """Transformer-XL memory (stage-local hidden) and a tied adaptive softmax with projections."""
    ref, ranks = p2_vs_p1["xl-adaptive"]
    assert_same_training(ref, ranks)


@pytest.mark.distributed
@pytest.mark.slow
def test_p2_dp2_equals_p1_dp1(tmp_path):
    """4 processes (2 stages x 2 replicas) train like one process holding all streams."""
    ((ref,),) = launch(tmp_path / "p1", 1, "--micro", "1", "--accum", "4", "--layers", "2")
    ranks = [r for (r,) in launch(tmp_path / "p2dp2", 4, "--stages", "2", "--micro", "1",
                                  "--accum", "2", "--layers", "2", timeout=240)]
    assert sorted((r["stage"], r["dp"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert_same_training(ref, ranks)
