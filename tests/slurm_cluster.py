"""A real single-node Slurm cluster for the `slurm` test tier.

Why a real cluster: the sbatch scripts in slurm/ are only worth something if `sbatch`, `srun`,
`--signal`, `scontrol requeue` and `--dependency` really behave the way the scripts assume. So the
tests install Debian's Slurm packages (slurmctld, slurmd, slurm-client) when they are missing,
start slurmctld + slurmd on 127.0.0.1 with every piece of state, log and PID file under one
temporary folder, and stop exactly the daemons they started (by their PID files) afterwards.

The set-up avoids everything a CI machine may lack: no munge (auth/none, cred/none), no systemd
(the daemons fork themselves), no cgroups (proctrack/linuxproc, task/none). Needs root.

Run by hand: `python tests/slurm_cluster.py up DIR` (prints `export SLURM_CONF=...`), then
`python tests/slurm_cluster.py down DIR`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

# binary -> Debian package that provides it
PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}
PARTITION = "debug"


class ClusterError(RuntimeError):
    """The local cluster could not be set up or did not answer; the message names the log."""


def ensure_installed(timeout_s: float = 900) -> None:
    """apt-get install the Slurm packages that are missing (CI starts from a fresh Debian).

    Raises:
        ClusterError: not root, or apt-get failed (its output tail is in the message).
    """
    missing = [pkg for binary, pkg in PACKAGES.items() if shutil.which(binary) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterError(f"Slurm packages missing ({' '.join(missing)}) and not root: run "
                           f"`apt-get install -y --no-install-recommends {' '.join(missing)}` "
                           "as root, or deselect this tier with -m 'not slurm'")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-2000:]
            raise ClusterError(f"`{' '.join(cmd)}` failed (rc={proc.returncode}):\n{tail}")


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick), so two clusters never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int, comm: str) -> bool:
    """True if `pid` is a live, non-zombie process named `comm` (never signal a stranger)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return name == comm and state not in ("Z", "X")


def wait_until(check: Callable[[], T], *, timeout_s: float, what: str, poll_s: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; raise ClusterError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def parse_fields(line: str) -> dict[str, str]:
    """`Key=Value Key2=Value2 ...` (scontrol -o, jobcomp/filetxt) -> dict; values have no spaces."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


class SlurmCluster:
    """slurmctld + slurmd on 127.0.0.1 with config, state, logs and PID files under `root`."""

    def __init__(self, root: Path, *, cpus: int = 2, min_job_age_s: int = 5) -> None:
        self.root = Path(root)
        self.cpus = cpus
        # MinJobAge <= 5 makes `sbatch --wait` poll every 2 s instead of 10, 42, 74... s.
        self.min_job_age_s = min_job_age_s
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"
        self.jobcomp = self.log_dir / "jobcomp.txt"
        self.node = socket.gethostname().split(".")[0]

    # ------------------------------------------------------------------ config
    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands and jobs: our config, not /etc/slurm."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _config_text(self, ctld_port: int, slurmd_port: int) -> str:
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        try:
            loopback = socket.gethostbyname(socket.gethostname()) == "127.0.0.1"
        except OSError:
            loopback = False
        # Binding to the hostname's address only works when it is exactly 127.0.0.1: with
        # Debian's "127.0.1.1 host" line srun would listen there while slurmstepd connects back
        # from 127.0.0.1 ("Slurmd could not connect IO").
        bind = "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny" if loopback else ""
        r = self.root
        return f"""# written by tests/slurm_cluster.py: one node on 127.0.0.1, no munge/cgroups
ClusterName=lamemoci
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
{bind}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self.run_dir}/slurmctld.pid
SlurmdPidFile={self.run_dir}/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge={self.min_job_age_s}
# start a submitted batch job at the next scheduling pass, not up to 3 s later
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    # ------------------------------------------------------------------ daemons
    def start(self, timeout_s: float = 60) -> None:
        """Install if needed, write slurm.conf, start both daemons, wait for an idle node."""
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterError("the local Slurm cluster runs its daemons as root; run as root "
                               "or deselect this tier with -m 'not slurm'")
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.conf.write_text(self._config_text(free_port(), free_port()))
        self._spawn("slurmctld", ["slurmctld", "-f", str(self.conf)])
        wait_until(lambda: "is UP" in self.cmd("scontrol", "ping", check=False).stdout,
                   timeout_s=timeout_s, what=f"slurmctld ({self.log_dir}/slurmctld.log)")
        self._spawn("slurmd", ["slurmd", "-f", str(self.conf), "-N", self.node])
        wait_until(self._node_ready, timeout_s=timeout_s,
                   what=f"node {self.node} to be idle ({self.log_dir}/slurmd.log)")

    def _spawn(self, name: str, argv: list[str]) -> None:
        # The daemon forks and the parent exits; its output goes to a file so a pipe held by
        # the daemon can never block us.
        with open(self.log_dir / f"{name}.stderr", "ab") as err:
            proc = subprocess.run(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=err,
                                  stderr=err, timeout=60, start_new_session=True)
        if proc.returncode != 0:
            raise ClusterError(f"{name} failed to start (rc={proc.returncode}); see "
                               f"{self.log_dir}/{name}.log and {name}.stderr")
        wait_until(lambda: self._pid(name) is not None, timeout_s=30,
                   what=f"{name} PID file in {self.run_dir}")

    def _node_ready(self) -> bool:
        state = self.cmd("sinfo", "-h", "-N", "-n", self.node, "-o", "%t",
                         check=False).stdout.strip()
        if state.startswith(("down", "drain", "fail")):
            self.cmd("scontrol", "update", f"NodeName={self.node}", "State=RESUME", check=False)
        return state in ("idle", "mix", "alloc")

    def _pid(self, name: str) -> int | None:
        """PID of our daemon `name` from its PID file, if it is alive."""
        try:
            pid = int((self.run_dir / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid, name) else None

    def stop(self, timeout_s: float = 30) -> None:
        """Cancel our jobs (so no slurmstepd outlives slurmd), then stop both daemons.

        Safe to call twice and after a failed start; only PIDs from our PID files are signalled.
        """
        if self._pid("slurmctld") is not None:
            jobs = self.cmd("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.cmd("scancel", *jobs, check=False)
                try:
                    wait_until(lambda: not self.cmd("squeue", "-h", "-o", "%i",
                                                    check=False).stdout.split(),
                               timeout_s=timeout_s, what="cancelled jobs to end")
                except ClusterError:
                    pass  # still stop the daemons below
        for name in ("slurmd", "slurmctld"):
            self._stop_daemon(name, timeout_s)

    def _stop_daemon(self, name: str, timeout_s: float) -> None:
        pid = self._pid(name)
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not pid_alive(pid, name), timeout_s=timeout_s, what=f"{name} exit")
        except ClusterError:
            if pid_alive(pid, name):
                os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ clients
    def cmd(self, *argv: str, check: bool = True, timeout_s: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; raise with its output on failure."""
        proc = subprocess.run(list(argv), env=env or self.env, capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise ClusterError(f"`{' '.join(argv)}` failed (rc={proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, script: str | Path, *options: str, wait: bool = False,
               timeout_s: float = 300, env: dict[str, str] | None = None) -> tuple[int, int]:
        """Submit `script` with sbatch options; return (job id, sbatch's exit code).

        With wait=True, sbatch returns when the job ends and its exit code is the job's.
        """
        argv = ["sbatch", "--parsable", *(["--wait"] if wait else []), *options, str(script)]
        proc = self.cmd(*argv, check=False, timeout_s=timeout_s, env=env)
        match = re.match(r"(\d+)", proc.stdout.strip())
        if not match:
            raise ClusterError(f"sbatch gave no job id (rc={proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
        return int(match.group(1)), proc.returncode

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` fields (JobState, Restarts, ...); empty once the job has aged out."""
        proc = self.cmd("scontrol", "-o", "show", "job", str(job_id), check=False)
        return parse_fields(proc.stdout) if proc.returncode == 0 else {}

    def completions(self, job_id: int) -> list[dict[str, str]]:
        """Every record jobcomp/filetxt wrote for the job (one per run, requeues included)."""
        if not self.jobcomp.exists():
            return []
        records = [parse_fields(line) for line in self.jobcomp.read_text().splitlines()]
        return [r for r in records if r.get("JobId") == str(job_id)]

    def wait_finished(self, job_id: int, timeout_s: float = 300) -> dict[str, str]:
        """Wait until the job has left the queue for good; return its last completion record."""
        def done() -> dict[str, str] | None:
            state = self.job(job_id).get("JobState", "")
            if state in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED",
                         "SUSPENDED"):
                return None
            records = [r for r in self.completions(job_id) if r.get("JobState") != "REQUEUED"]
            return records[-1] if records else None

        return wait_until(done, timeout_s=timeout_s, what=f"job {job_id} to finish", poll_s=0.5)

    def overrides(self, *, ntasks: int, output: Path, minutes: int = 10) -> list[str]:
        """sbatch options that fit a real script's GPU-cluster header onto this 2-CPU node.

        Command-line options win over `#SBATCH` lines, so the scripts themselves stay as a real
        cluster runs them.
        """
        return ["-p", PARTITION, "--nodes=1", "--gpus-per-node=0", f"--ntasks-per-node={ntasks}",
                "--cpus-per-task=1", f"--time={minutes}", "-o", str(output)]

    def logs_tail(self, chars: int = 3000) -> str:
        """The end of both daemon logs, for assertion messages."""
        out = []
        for name in ("slurmctld", "slurmd"):
            path = self.log_dir / f"{name}.log"
            if path.exists():
                out.append(f"--- {path}\n{path.read_text()[-chars:]}")
        return "\n".join(out)


@pytest.fixture(scope="session", name="slurm")
def slurm_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running cluster shared by the slurm tier (tests/conftest.py registers it once); its
    daemons are stopped at the end of the session, also when a test fails."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str]) -> int:
    """`up DIR` / `down DIR`: the same cluster, by hand."""
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python tests/slurm_cluster.py up|down DIR", file=sys.stderr)
        return 2
    cluster = SlurmCluster(Path(argv[1]).resolve())
    if argv[0] == "up":
        try:
            cluster.start()
        except ClusterError:
            cluster.stop()
            raise
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
