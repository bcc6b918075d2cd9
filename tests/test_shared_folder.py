"""`lamemo train` refuses a run folder that the ranks do not share (checkpoints need one)."""

from __future__ import annotations

import pytest
from train_support import run_ranks

pytestmark = pytest.mark.distributed

RANK_SCRIPT = """
import sys, torch.distributed as tdist
from lamemo_ds.checkpoint.run_folder import require_shared_folder
from lamemo_ds.parallel.dist import Comm
tdist.init_process_group("gloo")
comm = Comm()
try:
    require_shared_folder(comm, sys.argv[1 + comm.rank] if len(sys.argv) > 2 else sys.argv[1],
                          wait_s=0.5)
    print("SHARED")
except RuntimeError as e:
    print("ERROR", e)
tdist.destroy_process_group()
"""


def _run(folders: list[str]) -> list[str]:
    return [r.stdout for r in run_ranks(["-c", RANK_SCRIPT, *folders], timeout=120)]


def test_one_folder_passes_and_leaves_nothing_behind(tmp_path):
    out = _run([str(tmp_path / "run")])
    assert all("SHARED" in o for o in out), out
    assert list((tmp_path / "run").iterdir()) == []  # the marker is removed


def test_a_folder_each_rank_sees_differently_fails_on_every_rank(tmp_path):
    """Two ranks given two different paths stand for two nodes with node-local disks."""
    out = _run([str(tmp_path / "node0"), str(tmp_path / "node1")])
    for o in out:
        assert "ERROR" in o and "is not shared by all ranks: rank(s) [1]" in o, out
        assert "train.output_dir=" in o and "file system all nodes mount" in o
    assert "this rank cannot" in out[1] and "this rank can;" in out[0]
