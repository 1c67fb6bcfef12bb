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


FRESH_IMPORT = r"""
import sys
from heptapod_ds.data.ffcv_compat import ensure_patched
ensure_patched()
import numba.typed
import ffcv.fields.rgb_image as rgb
print("typeddict_compiled", "numba.typed.typeddict" in sys.modules)
print("modes", sorted(rgb.IMAGE_MODES.items()))
print("numba_restored", numba.typed.Dict.__module__)
"""


def test_ffcv_import_skips_the_typed_dict_compile_and_restores_numba():
    """FFCV's JPEG/raw mode table is a plain dict (it is only read from Python), so no process pays numba's
    typed-dict compile; numba.typed.Dict is numba's own again afterwards."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FRESH_IMPORT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert got == {"typeddict_compiled": "False", "modes": "[('jpg', 0), ('raw', 1)]",
                   "numba_restored": "numba.typed.typeddict"}, out.stdout
