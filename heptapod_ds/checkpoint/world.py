"""A one-process gloo world for offline tools: megatron's layers need its parallel state to exist even
when nothing is distributed (the converter builds models on the ``meta`` device)."""
from __future__ import annotations

import atexit


def ensure_local_world() -> None:
    """Initialize TP=PP=DP=1 on this process unless a parallel state already exists."""
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.distributed.launch_env import LaunchEnv, free_port

    if parallel_state.is_initialized():
        return
    env = LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port(),
                    launcher="single")
    parallel_state.initialize(tensor=1, pipeline=1, backend="gloo", seed=0, launch=env)
    atexit.register(parallel_state.destroy)
