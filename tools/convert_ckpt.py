#!/usr/bin/env python
"""Convert Heptapod checkpoints: releases, other parallel layouts, inspection, verification.

    python tools/convert_ckpt.py to-release --ckpt runs/b --out releases/b [--weights ema|raw] [--dtype fp32|bf16]
    python tools/convert_ckpt.py reshard --ckpt runs/b --out runs/b_tp1 --tensor 1 --pipeline 1 --dp 8 --zero 1
    python tools/convert_ckpt.py from-release --release releases/b --out runs/ft --tensor 2 --pipeline 1 --dp 4 --zero 3
    python tools/convert_ckpt.py inspect PATH
    python tools/convert_ckpt.py verify PATH

See ``python tools/convert_ckpt.py COMMAND --help`` and heptapod_ds/checkpoint/.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the converter never needs a GPU

from heptapod_ds.checkpoint.cli import main  # noqa: E402

if __name__ == "__main__":
    from heptapod_ds.distributed.process_exit import exit_process

    exit_process(main())
