from heptapod_ds.distributed.launch_env import detect, first_slurm_host


def test_torchrun_env():
    e = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (3, 8, 1, "n1", 1234, "torchrun")


def test_deepspeed_launcher_env():
    e = detect({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "CROSS_RANK": "0"})
    assert e.launcher == "deepspeed"


def test_slurm_env():
    e = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NODELIST": "gpu[007-008]"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (5, 16, 5, "srun")
    assert e.master_addr == "gpu007" and e.master_port == 20000 + 4242


def test_slurm_nodelist_parsing():
    assert first_slurm_host("node[12,15-17],gpu1") == "node12"
    assert first_slurm_host("gpu1,gpu2") == "gpu1"


def test_single_process():
    e = detect({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single") and e.master_port > 0


def test_multinode_job_with_a_loopback_master_stops_at_once_saying_so():
    import socket

    import pytest

    from heptapod_ds.distributed.launch_env import LaunchEnv, check_multinode_addresses, nodes_in_job

    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}
    assert nodes_in_job(env) == 2 and nodes_in_job({}) == 1
    launch = LaunchEnv(1, 4, 1, "localhost", 29500, "srun")
    with pytest.raises(RuntimeError, match=r"a job on 2 nodes cannot use a loopback address: MASTER_ADDR "
                                           r"'localhost' resolves to 127\.0\.0\.1"):
        check_multinode_addresses(launch, "nccl", env)
    # One node: loopback is fine. A non-loopback master on two nodes passes the MASTER_ADDR check.
    check_multinode_addresses(launch, "nccl", {"SLURM_JOB_NUM_NODES": "1"})
    check_multinode_addresses(LaunchEnv(1, 4, 1, "192.0.2.1", 29500, "srun"), "nccl", env)
    # gloo advertises this host's name: a name that resolves to loopback is refused unless an interface is named.
    host = socket.gethostname()
    try:
        loop = socket.gethostbyname(host).startswith("127.")
    except OSError:
        loop = False
    if loop:
        with pytest.raises(RuntimeError, match="this host's name"):
            check_multinode_addresses(LaunchEnv(1, 4, 1, "192.0.2.1", 29500, "srun"), "gloo", env)
        check_multinode_addresses(LaunchEnv(1, 4, 1, "192.0.2.1", 29500, "srun"), "gloo",
                                  dict(env, GLOO_SOCKET_IFNAME="eth0"))


def test_backend_choice_without_a_gpu(caplog):
    import logging

    import pytest
    import torch

    from heptapod_ds.distributed.parallel_state import choose_backend

    if torch.cuda.is_available():
        pytest.skip("this test is about a task that sees no GPU")
    with pytest.raises(RuntimeError, match=r"parallel.backend=nccl needs a GPU, but this task sees none \(host .*"
                                           r"CUDA_VISIBLE_DEVICES=.*parallel.backend=gloo"):
        choose_backend("nccl")
    with caplog.at_level(logging.WARNING, logger="heptapod_ds.distributed.parallel_state"):
        assert choose_backend("gloo") == "gloo"
        assert not caplog.records, "an explicit gloo is asked for: no warning"
        assert choose_backend("auto") == "gloo"
    assert any("parallel.backend=auto: this task sees no GPU" in r.getMessage() and "using gloo" in r.getMessage()
               for r in caplog.records), caplog.text
    with pytest.raises(ValueError):
        choose_backend("mpi")
