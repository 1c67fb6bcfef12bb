import pytest
import torch

from heptapod_ds.distributed import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU bridge is off on GPU")


@pytest.fixture
def applied():
    cpu_compat.apply()
    yield
    cpu_compat.remove()


def test_apply_is_idempotent_and_reversible():
    cpu_compat.remove()  # an earlier in-process test's parallel_state.initialize may have applied it
    orig = torch.cuda.current_device
    assert cpu_compat.apply() and cpu_compat.apply()
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # no-op instead of an error
    cpu_compat.remove()
    assert torch.cuda.current_device is orig


def test_tracker_fork_isolates_streams(applied):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    cpu_compat.seed_model_parallel_rng(5, tp_rank=0)
    tracker = get_cuda_rng_tracker()
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(3)
    b = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(b, torch.rand(3)), "forking must leave the default generator untouched"
    with tracker.fork():
        a2 = torch.rand(3)
    assert not torch.equal(a, a2), "the forked stream advances between forks"
    cpu_compat.seed_model_parallel_rng(5, tp_rank=0)
    with tracker.fork():
        assert torch.equal(torch.rand(3), a), "same seed and rank reproduce the stream"
    cpu_compat.seed_model_parallel_rng(5, tp_rank=1)
    with tracker.fork():
        assert not torch.equal(torch.rand(3), a), "TP ranks get different streams"


def test_cuda_factories_on_cpu(applied):
    with cpu_compat.cuda_factories_on_cpu():
        z = torch.zeros(2, device="cuda")
        o = torch.ones(2, device=torch.device("cuda"))
        moved = z.cuda()
    assert z.device.type == o.device.type == moved.device.type == "cpu"


def test_factories_untouched_when_not_applied():
    cpu_compat.remove()
    with cpu_compat.cuda_factories_on_cpu():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")
