import torch


def test_single_rank_fixture(single_rank):
    from heptapod_ds.distributed import parallel_state
    assert single_rank.world_size == 1 and single_rank.tp_size == 1 and single_rank.dp_size == 1
    assert parallel_state.is_rank0() and parallel_state.device() == torch.device("cpu")


def test_fixture_can_be_used_twice(single_rank):
    assert single_rank.rank == 0
