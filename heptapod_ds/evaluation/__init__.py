"""Sample quality: Fréchet distance, feature statistics, Inception Score, reference statistics,
digits class-consistency, sample grids."""
from .digits_quality import DigitsJudge, frechet_distance
from .feature_stats import FeatureStats
from .frechet import frechet_distance_from_stats
from .grid import save_class_grid
from .inception_score import InceptionScoreStats, inception_score
from .ref_stats import load_ref_stats, save_ref_stats

__all__ = ["DigitsJudge", "FeatureStats", "InceptionScoreStats", "frechet_distance",
           "frechet_distance_from_stats", "inception_score", "load_ref_stats", "save_class_grid",
           "save_ref_stats"]
