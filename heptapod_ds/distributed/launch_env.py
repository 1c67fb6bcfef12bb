"""Read rank, world size and rendezvous address from whatever launched this process.

Supported launchers: ``torchrun`` and the ``deepspeed`` launcher (``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``), Slurm's ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID``, master = first host of ``SLURM_JOB_NODELIST``), OpenMPI (``OMPI_COMM_WORLD_*``),
and a plain ``python`` start (a single process on 127.0.0.1 with a free port).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,010],cpu1`` (scontrol when available)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\]", head)
    if not m:
        return head
    first = m.group(2).split(",")[0].split("-")[0]
    return m.group(1) + first


def env_rank(env=None) -> int:
    """This process's global rank as the launcher announced it, without resolving any address: the
    precedence of :func:`detect` (``RANK``, then srun, then mpirun), 0 when alone.
    Under ``srun`` only ``SLURM_PROCID`` says it before torch.distributed sets ``RANK``."""
    return _env_ranks(os.environ if env is None else env)[0]


def env_local_rank(env=None) -> int:
    """This process's rank on its node (``LOCAL_RANK``, ``SLURM_LOCALID``, ...), 0 when alone."""
    return _env_ranks(os.environ if env is None else env)[1]


def _env_ranks(env):
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
    if "OMPI_COMM_WORLD_RANK" in env:
        return int(env["OMPI_COMM_WORLD_RANK"]), int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
    return 0, 0


def detect(env=None) -> LaunchEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "CROSS_RANK" in env else "torchrun"
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
        # A port derived from the job id lets every task agree without communication.
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port, "srun")
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                         int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", 29500)), "mpirun")
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single")


def nodes_in_job(env=None) -> int:
    """How many hosts this launch spans, as the launcher says (1 when it does not say)."""
    env = os.environ if env is None else env
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES", "GROUP_WORLD_SIZE", "NNODES"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 1


def _resolves_to_loopback(host: str):
    """The loopback address ``host`` resolves to here, or None (also None when it does not resolve)."""
    import ipaddress

    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return None
    for info in infos:
        addr = info[4][0]
        if ipaddress.ip_address(addr.split("%")[0]).is_loopback:
            return addr
    return None


def check_multinode_addresses(launch: LaunchEnv, backend: str = "gloo", env=None) -> None:
    """Stop at once when a multi-node world would rendezvous or advertise on a loopback address.

    On one host every address works. Across hosts, a ``MASTER_ADDR`` that resolves to 127.x or ::1 here
    sends this rank to itself, and a hostname that does (Debian's ``127.0.1.1 <hostname>`` line in
    /etc/hosts) is what gloo advertises to the peers on the other hosts: either way the job hangs until
    the collective timeout, then fails without saying why."""
    env = os.environ if env is None else env
    nodes = nodes_in_job(env)
    if nodes <= 1 or launch.world_size <= 1:
        return
    host = socket.gethostname()
    names = [("MASTER_ADDR", launch.master_addr)]
    if backend == "gloo" and not env.get("GLOO_SOCKET_IFNAME"):  # gloo advertises the hostname's address
        names.append(("this host's name", host))
    for what, name in names:
        loop = _resolves_to_loopback(name)
        if loop is not None:
            raise RuntimeError(
                f"a job on {nodes} nodes cannot use a loopback address: {what} {name!r} resolves to {loop} on "
                f"host {host} (rank {launch.rank}), so the ranks on the other nodes could not reach it. Give the "
                f"node names their network address in /etc/hosts or DNS (Debian's '127.0.1.1 <hostname>' line "
                f"is the usual cause), or set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the cluster network.")
