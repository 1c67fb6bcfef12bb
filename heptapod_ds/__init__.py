"""heptapod_ds: distributed training, conversion, sampling and scoring for Heptapod image generators."""
from . import _megatron_startup

_megatron_startup.install()
