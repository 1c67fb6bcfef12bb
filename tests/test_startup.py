"""heptapod_ds's lighter first imports of megatron-core and DeepSpeed's Muon module on CPU
(heptapod_ds/_startup.py)."""
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

# what DeepSpeed's engine imports for every ZeRO stage > 0 (is_zero_supported_optimizer)
MUON_PROBE = r"""
import sys
import heptapod_ds
import torch
real_compile = torch.compile
from deepspeed.runtime.zero.muon import muon_optimizer, original_muon
print("dynamo", "torch._dynamo" in sys.modules)
print("restored", torch.compile is real_compile)
print("muon_deferred", original_muon.zeropower_via_newtonschulz5.__wrapped__.__name__ == "zeropower_via_newtonschulz5")
import megatron.core
print("finder_removed", not any(type(f).__name__ == "_LighterFinder" for f in sys.meta_path))
"""


def _probe(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split() for line in out.stdout.splitlines() if line.count(" ") == 1)


def test_megatron_imports_without_dynamo_and_restores_what_it_touched():
    got = _probe(PROBE)
    assert got == {"dynamo": "False", "restored": "True", "wandb_blocked_after": "False", "fuser_deferred": "True",
                   "squared_relu_deferred": "True", "wandb_importable": "True"}, got


def test_deepspeed_zero_optimizer_check_imports_without_dynamo():
    got = _probe(MUON_PROBE)
    assert got == {"dynamo": "False", "restored": "True", "muon_deferred": "True", "finder_removed": "True"}, got
