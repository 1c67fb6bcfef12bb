"""Process groups (torch.distributed + megatron-core), launcher detection, the CPU bridge for megatron."""
from . import cpu_compat, parallel_state
from .launch_env import LaunchEnv, detect, free_port
from .parallel_state import MegatronMPU, ParallelInfo, destroy, get_info, initialize, is_rank0, mpu

__all__ = ["LaunchEnv", "MegatronMPU", "ParallelInfo", "cpu_compat", "destroy", "detect", "free_port",
           "get_info", "initialize", "is_rank0", "mpu", "parallel_state"]
