"""Which exceptions count as a failed collective (a dead or hung peer): those print one clear line and exit."""
import pytest

from heptapod_ds.distributed.failures import collective_failure


@pytest.mark.parametrize("message", [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242",
    "Application timeout caused pair closure",  # gloo, inside an all_reduce, when a pipeline stage's rank hung
    "Timed out waiting 30000ms for recv operation to complete",
    "NCCL communicator was aborted on rank 3",
])
def test_failed_collectives_are_recognised(message):
    assert collective_failure(RuntimeError(message + "\nmore lines")) == message


@pytest.mark.parametrize("exc", [RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"),
                                 ValueError("timestep 70 needs backbone outputs o_0..o_t, only 64 given."),
                                 KeyError("module")])
def test_bugs_are_not_collective_failures(exc):
    assert collective_failure(exc) is None
