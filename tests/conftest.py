"""Session-wide test settings: CPU only, quiet DeepSpeed, one compiled-extension cache per run."""
import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# DeepSpeed compiles a shared-memory op on first init (~30 s). One stable folder per checkout means
# the compile is paid once per test session (and once per machine locally), also by spawned ranks.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HEPTAPOD_TESTING", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HEPTAPOD_CACHE", str(REPO / ".cache" / "heptapod"))


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture
def single_rank():
    """A 1-process gloo world with megatron's groups (TP=PP=DP=1), torn down afterwards."""
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.distributed.launch_env import LaunchEnv, free_port

    if parallel_state.is_initialized():
        parallel_state.destroy()
    env = LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port(),
                    launcher="single")
    info = parallel_state.initialize(tensor=1, pipeline=1, seed=0, launch=env)
    yield info
    parallel_state.destroy()


def pytest_sessionstart(session):
    """Build DeepSpeed's shared-memory op once, here, before any test spawns ranks.

    Otherwise the first multi-rank test compiles it in 2-4 processes at once, and a build killed half-way
    (a timed-out test) leaves torch's ``lock`` file behind, on which every later start waits forever.
    A lock older than 10 minutes is such a leftover: no build of this op takes that long.
    """
    import time

    root = pathlib.Path(os.environ["TORCH_EXTENSIONS_DIR"])
    for lock in root.glob("*/lock"):
        if time.time() - lock.stat().st_mtime > 600:
            lock.unlink(missing_ok=True)
    try:
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()
    except Exception as e:  # the tests that need the op then report the real error themselves
        print(f"conftest: DeepSpeed's shm op did not build up front ({e}); tests will build it", file=sys.stderr)


@pytest.fixture(autouse=True)
def _no_parallel_state_leaks():
    """A test that leaves the parallel state initialized must not break the next one's initialize()."""
    yield
    from heptapod_ds.distributed import parallel_state

    if parallel_state.is_initialized():
        parallel_state.destroy()
