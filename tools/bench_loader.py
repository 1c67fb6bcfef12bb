#!/usr/bin/env python
"""Loader throughput, FFCV vs a memmap DataLoader: the ``loader`` row of ``python -m heptapod_ds.bench``.

    python tools/bench_loader.py [--quick] [--json OUT]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from heptapod_ds.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--only", "loader", *sys.argv[1:]]))
