"""Pipeline parallelism for the Heptapod model: the stage split, the stage modules, pipelined sampling."""
from .split import PipelineSplit, Stage, bubble_fraction, describe, parse_split, split_model

__all__ = ["PipelineSplit", "Stage", "bubble_fraction", "describe", "parse_split", "split_model"]
