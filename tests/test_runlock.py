"""One writer per run: the run-folder lock, stale takeover, workers that die with their launcher,
unique temp names and one metrics history (single-process pieces; the kill drill is
tests/test_kill_drill.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lamemo_ds.checkpoint.manager import CheckpointManager
from lamemo_ds.fileio import unique_temp
from lamemo_ds.parallel.dist import Comm
from lamemo_ds.train.metrics import read_losses, truncate_history
from lamemo_ds.train.runlock import LEASE_FILE, LOCK_FILE, RunFolderLocked, acquire, read_lease

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


def test_second_run_is_refused_naming_the_holder_and_writes_nothing(tmp_path):
    lock = acquire(tmp_path / "run", job_id="4242")
    try:
        lease = read_lease(tmp_path / "run")
        assert lease["pid"] == os.getpid() and lease["host"] == socket.gethostname()
        assert lease["job_id"] == "4242"
        before = _listing(tmp_path / "run")
        with pytest.raises(RunFolderLocked) as e:
            acquire(tmp_path / "run", job_id="4243")
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert "Slurm job 4242" in msg and "since 20" in msg and "train.output_dir" in msg
        assert _listing(tmp_path / "run") == before
    finally:
        lock.release()
    assert not (tmp_path / "run" / LEASE_FILE).exists()
    messages: list[str] = []
    acquire(tmp_path / "run", log=messages.append).release()  # free again, nothing to take over
    assert messages == []


def _holder(run: Path) -> subprocess.Popen:
    """A process that takes the lock of `run`, says so, then sleeps (or is killed)."""
    code = textwrap.dedent(f"""
        import sys, time
        from lamemo_ds.train.runlock import acquire
        lock = acquire({str(run)!r})
        print("locked", flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path):
    run = tmp_path / "run"
    p = _holder(run)
    try:
        with pytest.raises(RunFolderLocked, match=f"pid {p.pid}"):
            acquire(run)
    finally:
        p.kill()
        p.wait()
    messages: list[str] = []
    lock = acquire(run, log=messages.append)
    lock.release()
    assert len(messages) == 1 and f"pid {p.pid}" in messages[0]
    assert "taking over" in messages[0] and "no flock" in messages[0]


def test_flock_left_to_a_child_of_a_dead_holder_is_taken_over(tmp_path):
    """The holder is gone but its lock file is still locked (a descriptor inherited by a child):
    the lease's pid is dead on this host, so the lock file is replaced."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # stands for the child's inherited lock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run / LEASE_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                              "since": time.time(), "heartbeat": time.time()}))
    messages: list[str] = []
    try:
        lock = acquire(run, log=messages.append)
        lock.release()
    finally:
        os.close(fd)
    assert len(messages) == 1 and f"process {dead} no longer exists" in messages[0]


def test_other_host_is_trusted_until_its_heartbeat_is_stale(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lease = {"host": "node-elsewhere", "pid": 1, "job_id": "7", "since": time.time() - 50,
             "heartbeat": time.time() - 5}
    (run / LEASE_FILE).write_text(json.dumps(lease))
    with pytest.raises(RunFolderLocked, match="host node-elsewhere, pid 1, Slurm job 7"):
        acquire(run, stale_s=30)
    lease["heartbeat"] = time.time() - 60
    (run / LEASE_FILE).write_text(json.dumps(lease))
    messages: list[str] = []
    acquire(run, stale_s=30, log=messages.append).release()
    assert "heartbeat stopped" in messages[0] and "node-elsewhere" in messages[0]


def _within(seconds: float, cond) -> bool:
    """Poll `cond` every 50 ms for up to `seconds` (no fixed sleeps: CI machines are loaded)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def test_heartbeat_is_refreshed_and_a_takeover_is_noticed(tmp_path, capsys):
    lock = acquire(tmp_path, heartbeat_s=0.05)
    try:
        first = read_lease(tmp_path)["heartbeat"]
        assert _within(5, lambda: read_lease(tmp_path)["heartbeat"] > first)

        def take_over() -> bool:  # rewritten each time: a beat that read ours just before
            (tmp_path / LEASE_FILE).write_text(  # may write it back once (busy machine)
                json.dumps({"host": "x", "pid": 2, "token": "t"}))
            return lock.lost
        assert _within(5, take_over)
        assert "taken over" in capsys.readouterr().err
    finally:
        lock.release()
    assert (tmp_path / LEASE_FILE).exists()  # not ours any more: left alone


def test_run_whose_lock_was_taken_over_kills_itself(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from lamemo_ds.train.runlock import abort_process, acquire
        acquire({str(tmp_path)!r}, heartbeat_s=0.05, on_lost=abort_process)
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert child.stdout.readline().strip() == "locked"
    (tmp_path / LEASE_FILE).unlink()  # a lost lease is written again, not a takeover
    assert _within(10, lambda: (tmp_path / LEASE_FILE).is_file())
    assert child.poll() is None and read_lease(tmp_path)["pid"] == child.pid

    def take_over() -> bool:  # rewritten until noticed (a beat in flight may write ours back)
        (tmp_path / LEASE_FILE).write_text(json.dumps({"host": "x", "pid": 2, "token": "t"}))
        return child.poll() is not None
    assert _within(30, take_over)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert "taken over by another run (host x, pid 2" in child.stderr.read()


def _run_child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_worker_dies_when_its_launcher_is_killed(tmp_path):
    """launcher -> worker (armed with die_with_launcher); SIGKILL the launcher: the worker ends."""
    worker = textwrap.dedent("""
        import os, time
        from lamemo_ds.parallel.dist import die_with_launcher
        assert die_with_launcher(os.getppid(), "torchrun")
        print(os.getpid(), flush=True)
        time.sleep(600)
    """)
    launcher = _run_child(f"""
        import subprocess, sys, time
        w = subprocess.Popen([sys.executable, "-c", {worker!r}], stdout=subprocess.PIPE,
                             text=True)
        print(w.stdout.readline().strip(), flush=True)
        time.sleep(600)
    """)
    worker_pid = int(launcher.stdout.readline())
    assert _alive(worker_pid)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker_pid), f"worker {worker_pid} outlived its launcher"


def test_worker_whose_launcher_is_already_gone_exits_at_once():
    child = _run_child("""
        import os, time
        from lamemo_ds.parallel.dist import die_with_launcher
        die_with_launcher(os.getppid() + 1, "srun")  # not the parent any more: it died
        time.sleep(600)
    """)
    assert child.wait(timeout=60) == -signal.SIGKILL


def test_single_process_is_not_armed():
    from lamemo_ds.parallel.dist import die_with_launcher

    assert die_with_launcher(os.getppid(), "single") is False


def test_temp_names_are_unique_per_writer(tmp_path):
    a, b = unique_temp(tmp_path / "x.pt"), unique_temp(tmp_path / "x.pt")
    assert a != b and a.parent == tmp_path and str(os.getpid()) in a.name
    assert socket.gethostname() in a.name


def test_save_never_reuses_or_deletes_another_writers_temp_folder(tmp_path):
    """A leftover step-N.tmp* (another writer's) is neither reused nor deleted by a save; the
    next run (under the lock) removes it with remove_stale_temps."""
    import torch

    root = tmp_path / "checkpoints"
    other = root / "step-00000002.tmp-999-abcd"
    (other / "lamemo").mkdir(parents=True)
    (other / "lamemo" / "rank-00000.pt").write_bytes(b"being written")

    class Piece:
        def state_dict(self):
            return {"t": torch.ones(2)}

    def weights(folder, tag):
        (Path(folder) / tag).mkdir()
        (Path(folder) / tag / "w.pt").write_bytes(b"w")

    mgr = CheckpointManager(root, keep_last=2, comm=Comm(), log=lambda m: None)
    for step in (2, 2):  # the second save of step 2 moves the first aside, then publishes
        mgr.save(step, save_weights=weights, state={"p": Piece()}, config_text="a: 1\n",
                 meta={})
    assert (other / "lamemo" / "rank-00000.pt").read_bytes() == b"being written"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", other.name]
    assert mgr.find_latest().step == 2
    assert mgr.remove_stale_temps() == [other] and not other.exists()


def test_history_keeps_one_line_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)] + [{"step": 2, "eval": {}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    assert truncate_history(path, 2) == 3  # steps 3, 4 and the line cut short
    assert read_losses(path) == {1: 1.0, 2: 2.0}
    assert path.read_text().endswith('{"step": 2, "eval": {}}\n')
    assert truncate_history(path, 2) == 0
    assert truncate_history(tmp_path / "missing.jsonl", 0) == 0


def test_metrics_open_drops_later_lines_and_purges_tensorboard(tmp_path):
    """A run starting at step 5 keeps lines up to 5 and tells TensorBoard to drop the events of
    steps >= 6 that an earlier attempt wrote (a SessionLog START at step 6)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    from lamemo_ds.train.metrics import Metrics

    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)))
    m = Metrics(tmp_path, enabled=True, tensorboard=True)
    m.open(5)
    m.step(6, loss=2.0, skipped=False, lr=0.1)
    m.close()
    assert read_losses(tmp_path / "metrics.jsonl") == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0,
                                                        6: 2.0}
    events = [e for f in (tmp_path / "tensorboard").iterdir()
              for e in EventFileLoader(str(f)).Load()]
    starts = [e.step for e in events if e.HasField("session_log")
              and e.session_log.status == SessionLog.START]
    assert starts == [6]
