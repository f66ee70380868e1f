"""A real one-node SLURM for the `slurm` test tier: Debian's slurm-wlm and munge, started by the tests.

:func:`start` returns a :class:`Cluster` once ``sinfo`` shows this host idle, or a one-line reason why
there is no cluster here (the tier then skips, saying it). It never touches a SLURM it did not set up:
an ``/etc/slurm/slurm.conf`` without :data:`MARK` (a site's own config) is left alone and the tier
skips. Without SLURM, and when this process is root with ``apt-get``, it installs ``slurm-wlm`` and
``munge`` (about 20 s from Debian's mirror). The node declares more CPUs than the machine has
(``SlurmdParameters=config_overrides``) so that two 2-rank jobs run side by side on a 2-core CI box;
``AuthInfo=cred_expire=10`` shortens the hold of a requeued job before it may start again (120 s by default);
``MpiDefault=none`` and the tests launch with ``srun --mpi=pmi2``, because Debian's slurmd cannot
load its PMIx plugin. ``ESSA_TEST_SLURM=0`` turns the tier off.

Daemons this module started are stopped by :meth:`Cluster.stop`; the packages stay installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MARK = "# written by essa_hpc tests/real_slurm.py"
CONF = Path("/etc/slurm/slurm.conf")
STATE = Path("/var/spool/essa-tests")  # this cluster's own state and logs (never a site's StateSaveLocation)
CPUS = 4  # declared; more than a CI machine has, so two 2-task jobs run at once (jobs here barely compute)
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}


@dataclass
class Cluster:
    host: str
    started: list[int] = field(default_factory=list)  # pids of the daemons this module started

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, timeout=30)
        for pid in reversed(self.started):
            _stop_pid(pid)


def _gone(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def _stop_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL after 5 s (a slurmd that lost its controller ignores TERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:  # not our child: poll for its end
                if _gone(pid):
                    return
            time.sleep(0.1)


def _run(cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _tail(p: subprocess.CompletedProcess[str]) -> str:
    lines = (p.stderr or p.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit {p.returncode}"


def _install() -> str | None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "no SLURM here (no sbatch/slurmctld), and not root with apt-get to install Debian's slurm-wlm and munge"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        p = _run(cmd, timeout=900, env=env)
        if p.returncode != 0:
            return f"{' '.join(cmd)} failed: {_tail(p)}"
    return None


def _config(host: str) -> str:
    return f"""{MARK}
ClusterName=essa-tests
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={STATE}/slurmctld
SlurmdSpoolDir={STATE}/slurmd
SlurmctldPidFile={STATE}/slurmctld.pid
SlurmdPidFile={STATE}/slurmd.pid
SlurmctldLogFile={STATE}/slurmctld.log
SlurmdLogFile={STATE}/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=900
NodeName={host} CPUs={CPUS} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _running(name: str) -> bool:
    return _run(["pgrep", "-x", name]).returncode == 0


def _idle(host: str) -> bool:
    try:
        p = _run(["sinfo", "-h", "-n", host, "-o", "%t"], timeout=5)
    except subprocess.TimeoutExpired:  # sinfo retries while slurmctld is not up yet
        return False
    return p.returncode == 0 and p.stdout.strip() in ("idle", "mix", "alloc")


def start() -> Cluster | str:
    """A running one-node cluster on this host, or why there cannot be one."""
    if os.environ.get("ESSA_TEST_SLURM") == "0":
        return "ESSA_TEST_SLURM=0"
    if CONF.exists() and MARK not in CONF.read_text():
        return f"{CONF} exists and was not written by tests/real_slurm.py: this tier only runs on a SLURM it starts itself"
    if not all(Path(exe).exists() for exe in DAEMONS.values()) or shutil.which("sbatch") is None:
        why = _install()
        if why is not None:
            return why
    if os.geteuid() != 0:
        return "the SLURM daemons of this tier run as root; this process is not"
    host = socket.gethostname().split(".")[0]
    text = _config(host)
    if not CONF.exists() or CONF.read_text() != text:
        for name in ("slurmd", "slurmctld"):  # daemons of an older config of ours would keep it
            for pid in _run(["pgrep", "-x", name]).stdout.split():
                _stop_pid(int(pid))
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(text)
    for d in ("slurmctld", "slurmd"):
        (STATE / d).mkdir(parents=True, exist_ok=True)
    cluster = Cluster(host)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    for name, exe in DAEMONS.items():
        if _running(name):
            continue
        # slurmctld -c: start from empty state (job ids from 1), whatever an earlier session left
        cmd = {"munged": ["runuser", "-u", "munge", "--", exe, "--foreground"], "slurmctld": [exe, "-D", "-c"]}.get(name, [exe, "-D"])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        cluster.started.append(proc.pid)
        if name == "munged":
            for _ in range(50):
                if _run(["munge", "-n"]).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                cluster.stop()
                return "munged did not start (munge -n fails)"
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if _idle(host):
            return cluster
        dead = [name for name in ("slurmctld", "slurmd") if not _running(name)]
        if dead:
            cluster.stop()
            return f"{' and '.join(dead)} exited on start (see {STATE}/{dead[0]}.log)"
        time.sleep(0.25)
    cluster.stop()
    return f"slurmctld/slurmd started but sinfo does not show {host} idle after 30 s (see {STATE}/)"
