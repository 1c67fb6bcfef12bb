"""A throw-away one-node Slurm cluster on this machine, for testing the sbatch templates.

Everything lives in one temporary directory: a private ``munged`` (its own key and socket, so a
system munged is neither needed nor touched), ``slurm.conf`` for this host (CPUs from the machine,
``proctrack/linuxproc``, ``task/none``, no GPUs, free ports), and the state, spool, log and pid
files of ``slurmctld`` and ``slurmd``. The three daemons run in the foreground as child processes
of this one and are stopped by their pids, nothing else.

    python tests/slurm/local_slurm.py [DIR]     # start, print the SLURM_CONF to export, stop on Ctrl-C

The Slurm client commands (sbatch, scontrol, squeue, scancel) find the cluster through
``SLURM_CONF``; :meth:`LocalSlurm.env` returns an environment with it set.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun")


def missing_requirements() -> List[str]:
    """What this machine lacks to run the cluster (empty when it can)."""
    missing = []
    for tool in DAEMONS + CLIENTS:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            missing.append(f"the '{tool}' command (Debian packages slurm-wlm and munge; "
                           f"`bash tools/apt_ensure.sh slurm-wlm munge`)")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        missing.append("root: slurmd must run as root to launch jobs")
    return missing


def _which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmStartError(RuntimeError):
    """A daemon did not come up; the message carries the end of its log."""


class LocalSlurm:
    """Start with :meth:`start` (or ``with LocalSlurm() as cluster:``); :meth:`stop` ends exactly what
    :meth:`start` started."""

    def __init__(self, root: Optional[str] = None, cpus: Optional[int] = None, oversubscribe: int = 8):
        # munged's socket path must stay short (sun_path is 108 bytes) and every directory above it
        # must be searchable by all; a fresh mkdtemp under /tmp satisfies both.
        self.root = os.path.abspath(root or tempfile.mkdtemp(prefix="hslurm."))
        self.cpus = cpus or os.cpu_count() or 1
        self.oversubscribe = oversubscribe
        self.host = socket.gethostname().split(".")[0]
        self.procs: Dict[str, subprocess.Popen] = {}
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")

    # ------------------------------------------------------------------ set-up
    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def write_config(self) -> str:
        for sub, mode in (("munge", 0o755), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
            os.makedirs(self._path(sub), exist_ok=True)
            os.chmod(self._path(sub), mode)
        os.chmod(self.root, 0o711)
        key = self._path("munge.key")
        if not os.path.exists(key):
            with open(key, "wb") as fh:
                fh.write(os.urandom(1024))
        os.chmod(key, 0o600)
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        lines = [
            "# Written by tests/slurm/local_slurm.py: a one-node test cluster, removed after the test.",
            "ClusterName=heptapodtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (120 s by
            # default); the test's requeue would spend most of its time waiting.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={self._path('state')}",
            f"SlurmdSpoolDir={self._path('spool')}",
            f"SlurmctldPidFile={self._path('slurmctld.pid')}",
            f"SlurmdPidFile={self._path('slurmd.pid')}",
            f"SlurmctldLogFile={self._path('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self._path('log', 'slurmd.log')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            # Test all pending jobs every second (default 60 s): a requeued job becomes eligible by
            # the clock, not by an event, and would otherwise wait for the next minute's pass.
            "SchedulerParameters=sched_interval=1",
            "MailProg=/bin/true",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",           # seconds between SIGTERM and SIGKILL on cancel / time limit
            "MinJobAge=600",         # keep finished jobs visible to scontrol for the test's checks
            "InactiveLimit=0",
            "JobRequeue=1",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            # OverSubscribe lets several short test jobs share the machine's few CPUs at once.
            f"PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP "
            f"OverSubscribe=FORCE:{self.oversubscribe}",
        ]
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return self.conf

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        return env

    def _spawn(self, name: str, cmd: List[str]) -> None:
        log = open(self._path("log", f"{name}.stdout"), "wb")
        # A new session: a Ctrl-C in the terminal (or a signal to the test's process group) reaches
        # the daemons only through stop().
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True)
        log.close()

    def _wait_for(self, what: str, check, timeout: float, logs: List[str]) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmStartError(f"{name} exited with status {proc.returncode} while waiting for "
                                          f"{what}.\n{self._tails(logs + [name + '.stdout'])}")
            if check():
                return
            time.sleep(0.2)
        raise SlurmStartError(f"timed out after {timeout:.0f}s waiting for {what}.\n{self._tails(logs)}")

    def _tails(self, names: List[str], n: int = 25) -> str:
        out = []
        for name in names:
            path = self._path("log", name) if not os.path.isabs(name) else name
            if os.path.exists(path):
                with open(path, errors="replace") as fh:
                    tail = fh.readlines()[-n:]
                out.append(f"--- {path}\n" + "".join(tail))
        return "\n".join(out)

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        self.write_config()
        self._spawn("munged", [_which("munged"), "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={self._path('munge.key')}", f"--log-file={self._path('log', 'munged.log')}",
                               f"--pid-file={self._path('munged.pid')}", f"--seed-file={self._path('munged.seed')}"])
        try:
            self._wait_for("munged's socket", lambda: os.path.exists(self.munge_socket), timeout, ["munged.log"])
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
            self._wait_for("slurmctld", lambda: self._scontrol_ok(["ping"], "UP"), timeout, ["slurmctld.log"])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf, "-N", self.host])
            self._wait_for("the node to be idle", self._node_idle, timeout, ["slurmd.log", "slurmctld.log"])
        except BaseException:
            self.stop()
            raise
        return self

    def _scontrol_ok(self, args: List[str], needle: str) -> bool:
        try:
            out = subprocess.run([_which("scontrol"), *args], env=self.env(), capture_output=True, text=True,
                                 timeout=10).stdout
        except subprocess.SubprocessError:
            return False
        return needle in out

    def _node_idle(self) -> bool:
        return self._scontrol_ok(["show", "node", self.host], "State=IDLE")

    # ------------------------------------------------------------------ tear-down
    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to each daemon this object started (slurmd first), SIGKILL after ``timeout``."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def logs(self) -> str:
        return self._tails(["slurmctld.log", "slurmd.log"], n=60)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    lacking = missing_requirements()
    if lacking:
        sys.exit("cannot start a local Slurm: missing " + "; ".join(lacking))
    cluster = LocalSlurm(sys.argv[1] if len(sys.argv) > 1 else None).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        cluster.stop()
