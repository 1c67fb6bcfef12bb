"""heptapod_ds's lighter first import of megatron-core on CPU (heptapod_ds/_megatron_startup.py)."""
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA megatron is imported untouched")

PROBE = r"""
import sys
import heptapod_ds
import torch
real_compile = torch.compile
import megatron.core
from megatron.core import activations, jit
print("dynamo", "torch._dynamo" in sys.modules)
print("restored", torch.compile is real_compile)
print("wandb_blocked_after", sys.modules.get("wandb", "absent") is None)
print("fuser_deferred", jit.jit_fuser is not real_compile)
# compiled on the first call (not made here: an Inductor compile on CPU takes ~20 s)
print("squared_relu_deferred", activations.squared_relu.__wrapped__.__name__ == "squared_relu")
import importlib.util
print("wandb_importable", importlib.util.find_spec("wandb") is not None)
"""


def test_megatron_imports_without_dynamo_and_restores_what_it_touched():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = dict(line.split() for line in out.stdout.splitlines() if line.count(" ") == 1)
    assert got == {"dynamo": "False", "restored": "True", "wandb_blocked_after": "False", "fuser_deferred": "True",
                   "squared_relu_deferred": "True", "wandb_importable": "True"}, out.stdout
