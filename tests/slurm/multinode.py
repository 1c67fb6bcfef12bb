"""A throw-away Slurm cluster of several compute nodes on this one machine, for the multi-node tests.

Each compute node is a network namespace of its own (``ip netns add``) with a veth pair into a private
bridge, its own hostname (``unshare --uts``) and its own ``slurmd -N NODE``, started with
``nsenter --net=/run/netns/NS`` (``ip netns exec`` would remount /sys and hide the cgroup file system
slurmd needs). ``slurmctld`` and one ``munged`` run in the root namespace; the controller listens on the
bridge's address. Node names are added to /etc/hosts (the original is put back byte for byte).

Everything this module makes is named with one prefix (``hpt<pid>``) and removed by name or pid in
:meth:`MultiNodeSlurm.stop`, also after a failed start: the namespaces (and every process inside them),
the veth pairs, the bridge, the daemons, the /etc/hosts lines, the temporary directory.

Faults: :meth:`crash_node` SIGKILLs every process of a node's namespace (slurmd, slurmstepd, the tasks),
as a machine that loses power; :meth:`restart_node` starts its slurmd again; :meth:`partition` takes the
node's link down (and up again).

    python tests/slurm/multinode.py     # start 2 nodes, print the SLURM_CONF to export, stop on Ctrl-C
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_slurm import SlurmStartError, _free_port, _which, missing_requirements as _one_node_missing  # noqa: E402

HOSTS = "/etc/hosts"
NETNS_DIR = "/run/netns"


def missing_requirements() -> List[str]:
    """What this machine lacks to build the multi-node cluster (empty when it can)."""
    missing = _one_node_missing()
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            missing.append(f"the '{tool}' command (Debian packages iproute2 / util-linux)")
    if not missing:
        probe = f"hptprobe{os.getpid() % 100000}"
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if r.returncode != 0:
            missing.append(f"network namespaces (ip netns add: {r.stderr.strip()})")
        else:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return missing


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise SlurmStartError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _free_subnet() -> ipaddress.IPv4Network:
    """A private /24 that no address or route of this machine uses."""
    used = _run("ip", "-4", "-o", "addr", "show").stdout + _run("ip", "-4", "route", "show").stdout
    nets = []
    for word in used.split():
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            pass
    for third in range(213, 255):
        cand = ipaddress.ip_network(f"10.{third}.{os.getpid() % 200 + 20}.0/24")
        if not any(cand.overlaps(n) for n in nets if n.version == 4 and n.prefixlen > 0):
            return cand
    raise SlurmStartError("no free private /24 for the test bridge")


class MultiNodeSlurm:
    """``MultiNodeSlurm(nodes=2).start()`` ... ``.stop()``; node names are in :attr:`nodes`."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 4, root: Optional[str] = None,
                 partitions: Optional[Dict[str, List[int]]] = None, cred_expire: int = 62):
        """``partitions``: more partitions beside ``debug`` (all nodes, the default), as name -> node indices."""
        self.cred_expire = cred_expire
        self.tag = f"hpt{os.getpid() % 100000}"
        self.root = os.path.abspath(root or tempfile.mkdtemp(prefix="hslurmN."))
        self.cpus = cpus_per_node
        self.nodes = [f"{self.tag}n{i + 1}" for i in range(nodes)]
        self.netns = {n: f"{n}ns" for n in self.nodes}
        self.partitions = {name: [self.nodes[i] for i in idx] for name, idx in (partitions or {}).items()}
        self.veth = {n: f"{self.tag}v{i + 1}" for i, n in enumerate(self.nodes)}
        self.bridge = f"{self.tag}br"
        self.hosts_marker = f"# {self.tag}: tests/slurm/multinode.py"
        self.ctl_host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.procs: Dict[str, subprocess.Popen] = {}
        self.made = {"netns": [], "veth": [], "bridge": False, "hosts": None}
        self.subnet = None
        self.addr: Dict[str, str] = {}

    # ------------------------------------------------------------------ helpers
    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        return env

    def scontrol(self, *args: str, timeout: float = 15) -> str:
        try:
            return subprocess.run([_which("scontrol"), *args], env=self.env(), capture_output=True, text=True,
                                  timeout=timeout).stdout
        except subprocess.SubprocessError:
            return ""

    def node_state(self, node: str) -> str:
        out = self.scontrol("show", "node", "-o", node)
        for word in out.split():
            if word.startswith("State="):
                return word[len("State="):]
        return ""

    def _spawn(self, name: str, cmd: List[str]) -> subprocess.Popen:
        log = open(self._path("log", f"{name}.stdout"), "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(),
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def _wait_for(self, what: str, check, timeout: float, logs: List[str]) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name in ("munged", "slurmctld"):
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise SlurmStartError(f"{name} exited ({proc.returncode}) while waiting for {what}.\n"
                                          f"{self.tails(logs + [name + '.stdout'])}")
            if check():
                return
            time.sleep(0.3)
        raise SlurmStartError(f"timed out after {timeout:.0f}s waiting for {what}.\n{self.tails(logs)}")

    def tails(self, names: Optional[List[str]] = None, n: int = 30) -> str:
        names = names or ["slurmctld.log", *[f"slurmd-{node}.log" for node in self.nodes]]
        out = []
        for name in names:
            path = self._path("log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as fh:
                    out.append(f"--- {path}\n" + "".join(fh.readlines()[-n:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ set-up
    def _network(self) -> None:
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        bridge_addr = str(hosts[0])
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self.made["bridge"] = True
        _run("ip", "addr", "add", f"{bridge_addr}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        self.addr["controller"] = bridge_addr
        for i, node in enumerate(self.nodes):
            ns, veth = self.netns[node], self.veth[node]
            _run("ip", "netns", "add", ns)
            self.made["netns"].append(ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.made["veth"].append(veth)
            _run("ip", "link", "set", veth, "master", self.bridge)
            _run("ip", "link", "set", veth, "up")
            addr = str(hosts[10 + i])
            self.addr[node] = addr
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def _hosts(self) -> None:
        with open(HOSTS, "rb") as fh:
            original = fh.read()
        self.made["hosts"] = original
        lines = [f"{self.addr[n]} {n}  {self.hosts_marker}, removed on stop" for n in self.nodes]
        with open(HOSTS, "ab") as fh:
            fh.write(("" if original.endswith(b"\n") or not original else "\n").encode())
            fh.write(("\n".join(lines) + "\n").encode())

    def write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(self._path(sub), exist_ok=True)
            os.chmod(self._path(sub), 0o755)
        os.chmod(self.root, 0o711)
        key = self._path("munge.key")
        with open(key, "wb") as fh:
            fh.write(os.urandom(1024))
        os.chmod(key, 0o600)
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        lines = [
            "# Written by tests/slurm/multinode.py: a test cluster of network namespaces, removed after the test.",
            f"ClusterName={self.tag}",
            f"SlurmctldHost={self.ctl_host}({self.addr['controller']})",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: a requeued job waits this long (+1 s) before it starts again (120 s by default). Not
            # below 60 s: slurmctld retries the kill of a failed attempt to a node that did not answer about 60 s
            # later, by job id; a requeued attempt already running on that node would be killed with it.
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={self._path('state')}",
            f"SlurmdSpoolDir={self._path('spool', '%n')}",
            f"SlurmctldPidFile={self._path('slurmctld.pid')}",
            f"SlurmdPidFile={self._path('slurmd-%n.pid')}",
            f"SlurmctldLogFile={self._path('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self._path('log', 'slurmd-%n.log')}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=1",
            "SlurmdParameters=config_overrides",
            # A node that stops answering is DOWN after about SlurmdTimeout; it returns when its slurmd
            # registers again (ReturnToService=2); a job that lost a node is requeued (JobRequeue=1).
            "SlurmdTimeout=10", "ReturnToService=2", "JobRequeue=1", "KillWait=5",
            "MessageTimeout=5", "InactiveLimit=0", "MinJobAge=600",
            "MailProg=/bin/true", "JobCompType=jobcomp/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none",
            *[f"NodeName={n} NodeAddr={self.addr[n]} CPUs={self.cpus} State=UNKNOWN" for n in self.nodes],
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
            *[f"PartitionName={name} Nodes={','.join(nodes)} MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
              for name, nodes in self.partitions.items()],
        ]
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def start_slurmd(self, node: str) -> None:
        inner = f"hostname {node} && exec {_which('slurmd')} -D -f {self.conf} -N {node}"
        self._spawn(f"slurmd-{node}", ["nsenter", f"--net={NETNS_DIR}/{self.netns[node]}", "unshare", "--uts",
                                       "sh", "-c", inner])

    def start(self, timeout: float = 90.0) -> "MultiNodeSlurm":
        try:
            self._network()
            self._hosts()
            self.write_config()
            self._spawn("munged", [_which("munged"), "--foreground", f"--socket={self.munge_socket}",
                                   f"--key-file={self._path('munge.key')}",
                                   f"--log-file={self._path('log', 'munged.log')}",
                                   f"--pid-file={self._path('munged.pid')}",
                                   f"--seed-file={self._path('munged.seed')}"])
            self._wait_for("munged's socket", lambda: os.path.exists(self.munge_socket), timeout, ["munged.log"])
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
            self._wait_for("slurmctld", lambda: "UP" in self.scontrol("ping"), timeout, ["slurmctld.log"])
            for node in self.nodes:
                self.start_slurmd(node)
            self._wait_for("every node to be idle", lambda: all("IDLE" in self.node_state(n) for n in self.nodes),
                           timeout, [])
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------------ faults
    def ns_pids(self, node: str) -> List[int]:
        out = _run("ip", "netns", "pids", self.netns[node], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def crash_node(self, node: str) -> int:
        """SIGKILL every process in the node's namespace (a power loss); returns how many were killed."""
        killed = 0
        for _ in range(5):  # a process forked while the others die is caught by the next round
            pids = self.ns_pids(node)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        proc = self.procs.get(f"slurmd-{node}")
        if proc is not None:
            proc.wait(timeout=10)
        return killed

    def restart_node(self, node: str, timeout: float = 60.0) -> None:
        self.start_slurmd(node)

    def partition(self, node: str, up: bool) -> None:
        """The node's link down (or up again): its processes live on but reach nobody."""
        _run("ip", "link", "set", self.veth[node], "up" if up else "down")

    # ------------------------------------------------------------------ tear-down
    def stop(self, timeout: float = 20.0) -> None:
        """Remove exactly what :meth:`start` made, in reverse order; safe to call twice."""
        errors = []
        squeue = shutil.which("squeue")
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None and squeue:
            subprocess.run([_which("scancel"), "--user", "root"], env=self.env(),
                           capture_output=True, timeout=30)
        for node in self.nodes:  # slurmd, slurmstepd and the tasks: everything in the node's namespace
            if self.netns[node] in self.made["netns"]:
                try:
                    self.crash_node(node)
                except Exception as e:  # noqa: BLE001 - keep removing the rest
                    errors.append(f"{node}: {e}")
        for name in [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        for ns in list(self.made["netns"]):
            r = _run("ip", "netns", "del", ns, check=False)
            if r.returncode == 0 or not os.path.exists(os.path.join(NETNS_DIR, ns)):
                self.made["netns"].remove(ns)
            else:
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
        for veth in list(self.made["veth"]):  # gone with its namespace's peer, normally
            if _run("ip", "link", "show", veth, check=False).returncode == 0:
                _run("ip", "link", "del", veth, check=False)
            self.made["veth"].remove(veth)
        if self.made["bridge"]:
            _run("ip", "link", "del", self.bridge, check=False)
            self.made["bridge"] = False
        if self.made["hosts"] is not None:
            # Remove exactly this cluster's lines from the file as it is now (another cluster of a concurrent
            # session may have added or removed its own meanwhile); untouched, it is the original again.
            with open(HOSTS, "rb") as fh:
                now = fh.read()
            kept = b"".join(line for line in now.splitlines(keepends=True)
                            if self.hosts_marker.encode() not in line)
            with open(HOSTS, "wb") as fh:
                fh.write(kept)
            self.made["hosts"] = None
        if errors:
            raise RuntimeError("tear-down of the test cluster was incomplete: " + "; ".join(errors))

    def leftovers(self) -> List[str]:
        """What of this cluster still exists (empty after a complete stop)."""
        left = []
        netns = _run("ip", "netns", "list", check=False).stdout
        links = _run("ip", "-o", "link", "show", check=False).stdout
        with open(HOSTS) as fh:
            hosts = fh.read()
        left += [f"netns {ns}" for ns in self.netns.values() if ns in netns]
        left += [f"link {name}" for name in [*self.veth.values(), self.bridge] if f" {name}:" in links
                 or f" {name}@" in links]
        left += [f"/etc/hosts line of {self.tag}" for line in hosts.splitlines() if self.hosts_marker in line]
        left += [f"process {name} ({p.pid})" for name, p in self.procs.items() if p.poll() is None]
        return left

    def __enter__(self) -> "MultiNodeSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    lacking = missing_requirements()
    if lacking:
        sys.exit("cannot build the multi-node cluster: missing " + "; ".join(lacking))
    cluster = MultiNodeSlurm(int(sys.argv[1]) if len(sys.argv) > 1 else 2).start()
    print(f"export SLURM_CONF={cluster.conf}   # nodes {cluster.nodes}", flush=True)
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        cluster.stop()
        print("left over:", cluster.leftovers() or "nothing")
