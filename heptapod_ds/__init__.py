"""heptapod_ds: distributed training, conversion, sampling and scoring for Heptapod image generators."""
from . import _startup

_startup.install()
