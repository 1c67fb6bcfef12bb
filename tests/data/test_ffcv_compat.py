import torch

from heptapod_ds.data.ffcv_compat import ensure_patched


def test_ffcv_leaves_torch_threads_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ensure_patched()
        from ffcv.pipeline.compiler import Compiler
        Compiler.set_num_threads(1)  # what FFCV does at every loader and epoch
        assert torch.get_num_threads() == 2
        assert Compiler.num_threads == 1
    finally:
        torch.set_num_threads(before)
