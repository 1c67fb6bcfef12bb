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
