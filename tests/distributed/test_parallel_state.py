"""Foundation acceptance: TP MLP == dense, TP x DP groups, a megatron TransformerBlock at TP=2 on CPU."""
import pytest
import torch

from dist_harness import run_ranks

pytestmark = pytest.mark.slow


def _tp_mlp(rank, world_size):
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    from heptapod_ds.distributed import initialize

    info = initialize(tensor=2, pipeline=1, seed=1)
    assert info.tp_size == 2 and info.dp_size == 1
    hidden, ffn = 16, 32
    torch.manual_seed(123)  # identical dense weights and input on both ranks
    w1, b1 = torch.randn(ffn, hidden) / hidden ** 0.5, torch.randn(ffn) * 0.1
    w2, b2 = torch.randn(hidden, ffn) / ffn ** 0.5, torch.randn(hidden) * 0.1
    x = torch.randn(5, 3, hidden)

    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                              params_dtype=torch.float32)
    init = torch.nn.init.zeros_
    col = tensor_parallel.ColumnParallelLinear(hidden, ffn, config=cfg, init_method=init, bias=True,
                                               gather_output=False)
    row = tensor_parallel.RowParallelLinear(ffn, hidden, config=cfg, init_method=init, bias=True,
                                            input_is_parallel=True, skip_bias_add=False)
    shard = ffn // 2
    sl = slice(info.tp_rank * shard, (info.tp_rank + 1) * shard)
    with torch.no_grad():
        col.weight.copy_(w1[sl]); col.bias.copy_(b1[sl])
        row.weight.copy_(w2[:, sl]); row.bias.copy_(b2)

    xp = x.clone().requires_grad_(True)
    h, _ = col(xp)
    out, _ = row(F.gelu(h))
    out.sum().backward()

    xd = x.clone().requires_grad_(True)
    ref = F.linear(F.gelu(F.linear(xd, w1, b1)), w2, b2)
    ref.sum().backward()
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return rel(out, ref), rel(xp.grad, xd.grad)


def test_tp2_column_row_mlp_equals_dense():
    for fwd_err, grad_err in run_ranks(_tp_mlp, world_size=2, timeout=240):
        assert fwd_err < 1e-5 and grad_err < 1e-5


def _groups(rank, world_size):
    import torch.distributed as dist

    from heptapod_ds.distributed import initialize, mpu, parallel_state

    info = initialize(tensor=2, pipeline=1, seed=0)
    tp_ranks = dist.get_process_group_ranks(parallel_state.tp_group())
    dp_ranks = dist.get_process_group_ranks(parallel_state.dp_group())
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=parallel_state.dp_group())
    m = mpu()
    adapter = (m.get_data_parallel_world_size(), m.get_data_parallel_rank(), m.get_model_parallel_world_size(),
               m.get_model_parallel_rank(), m.get_pipeline_model_parallel_world_size())
    return info, sorted(tp_ranks), sorted(dp_ranks), t.item(), adapter


def test_tp2_dp2_groups_and_dp_allreduce():
    results = run_ranks(_groups, world_size=4, timeout=240)
    for rank, (info, tp_ranks, dp_ranks, reduced, adapter) in enumerate(results):
        # megatron's default order: TP peers are adjacent ranks, DP replicas are strided by TP.
        assert tp_ranks == [rank - rank % 2, rank - rank % 2 + 1]
        assert dp_ranks == [rank % 2, rank % 2 + 2]
        assert (info.tp_rank, info.dp_rank, info.tp_size, info.dp_size) == (rank % 2, rank // 2, 2, 2)
        assert reduced == sum(r + 1 for r in dp_ranks)
        assert adapter == (2, rank // 2, 2, rank % 2, 1)


def _transformer_block(rank, world_size):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    from heptapod_ds.distributed import initialize

    initialize(tensor=2, pipeline=1, seed=3)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                            tensor_model_parallel_size=2, hidden_dropout=0.1, attention_dropout=0.1,
                            params_dtype=torch.float32)
    block = TransformerBlock(cfg, get_gpt_layer_local_spec())
    x = torch.randn(6, 2, 32, requires_grad=True)  # [seq, batch, hidden]
    out = block(x, attention_mask=None)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in block.parameters() if p.requires_grad]
    return tuple(out.shape), all(g is not None and torch.isfinite(g).all() for g in grads), x.grad.abs().sum().item()


def test_megatron_transformer_block_tp2_on_cpu():
    for shape, finite, xgrad in run_ranks(_transformer_block, world_size=2, timeout=240):
        assert shape == (6, 2, 32) and finite and xgrad > 0


def _layouts_one_after_another(rank, world_size):
    import os

    from torch.distributed import distributed_c10d

    from heptapod_ds.distributed import parallel_state

    threads = []
    for tensor in (2, 1, 2):
        parallel_state.initialize(tensor=tensor, backend="gloo")
        made = len(distributed_c10d._world.pg_map) - 1  # beside the default group
        parallel_state.destroy(keep_process_group=True)
        threads.append(len(os.listdir("/proc/self/task")))
    parallel_state.destroy()
    return made, threads


@pytest.mark.slow
def test_building_layout_after_layout_does_not_leak_groups_or_threads():
    """megatron's destroy_model_parallel only forgets its groups; ours destroys them, so a process that builds
    one layout after another (the converter's tests) keeps a constant number of gloo threads."""
    for made, threads in run_ranks(_layouts_one_after_another, world_size=2, timeout=240):
        assert made >= 5, made
        assert threads[0] == threads[1] == threads[2], threads
