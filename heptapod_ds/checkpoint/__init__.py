"""Checkpoint conversion: training checkpoints of any layout <-> releases <-> other layouts.

Modules, one job each: :mod:`.names` (canonical names, the parameter table), :mod:`.zero_layout`
(DeepSpeed's ZeRO partition arithmetic and file names), :mod:`.reader` (training checkpoint ->
canonical tensors), :mod:`.release` (release folders: write, verify, load, build a model),
:mod:`.writer` (canonical state -> training checkpoint of a layout), :mod:`.output` (staged output
folders), :mod:`.cli` (``tools/convert_ckpt.py``).
"""
from .release import build_model_from_release, load_release, load_release_into, verify_release

__all__ = ["build_model_from_release", "load_release", "load_release_into", "verify_release"]
