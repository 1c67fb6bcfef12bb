"""Sample quality: digits class-consistency and Fréchet distance, sample grids."""
from .digits_quality import DigitsJudge, frechet_distance
from .grid import save_class_grid

__all__ = ["DigitsJudge", "frechet_distance", "save_class_grid"]
