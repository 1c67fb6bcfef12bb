"""``python -m heptapod_ds.bench``: what the stack costs and delivers, every row measured in one run.

Rows (``--only NAME``): ``train`` (full stack at ZeRO-0 / ZeRO-3 vs a plain-PyTorch reference of the
same network, achieved FLOP/s and MFU against a matmul peak measured in the same run), ``sampling``
(images/s with and without the KV cache, time shares), ``memory`` (bytes per rank at DP=2 for ZeRO
0-3, from the engine's own partitions), ``loader`` (FFCV vs a memmap DataLoader, against what presets
B and H consume on one H200 at 45% MFU) and ``gpu`` (the largest preset that fits, bf16). Compared
things are interleaved in one loop and reported as medians with their spread.
"""
