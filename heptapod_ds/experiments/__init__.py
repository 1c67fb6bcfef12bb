"""Ablation grids: named variants x seeds run as training runs (locally or as a Slurm array) and
reduced into a markdown report with score-vs-steps and score-vs-FLOPs plots (``tools/ablate.py``)."""
from .grid import Grid, GridError, RunSpec, load_grid
from .report import write_report

__all__ = ["Grid", "GridError", "RunSpec", "load_grid", "write_report"]
