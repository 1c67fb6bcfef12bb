"""Score generated 8x8 digits against scikit-learn's real digits.

A small MLP classifier is trained on the real digits (fixed seed, a few seconds on CPU). It gives:

* class-consistency: the share of samples classified as the class they were generated for;
* Fréchet distance between real and generated images in the classifier's hidden-feature space
  (the FID recipe with a digits classifier standing in for Inception).

``reference()`` reports the same two numbers for held-out *real* digits, the floor a perfect
generator would reach, so that a run's numbers can be read against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from .frechet import frechet_distance_from_stats


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets ``[n, d]``, in float64."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [n, d] with the same d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples on each side")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@dataclass
class DigitsScore:
    class_consistency: float
    frechet_distance: float
    num_samples: int

    def as_dict(self) -> Dict[str, float]:
        return {"class_consistency": self.class_consistency, "frechet_distance": self.frechet_distance,
                "num_samples": self.num_samples}


class DigitsJudge:
    """Classifier + feature extractor trained once on the real digits (images in [0, 1], 8x8)."""

    def __init__(self, seed: int = 0, holdout: float = 0.25):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        digits = load_digits()
        x = digits.data.astype(np.float64) / 16.0
        y = digits.target
        self.x_train, self.x_test, self.y_train, self.y_test = train_test_split(
            x, y, test_size=holdout, random_state=seed, stratify=y)
        self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed)
        self.clf.fit(self.x_train, self.y_train)
        self.test_accuracy = float(self.clf.score(self.x_test, self.y_test))
        self.real_features = self.features(x)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Hidden ReLU activations of the classifier: the space the Fréchet distance is measured in."""
        x = self._flat(x)
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    @staticmethod
    def _flat(images) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64)
        x = x.reshape(len(x), -1)
        if x.shape[1] != 64:
            raise ValueError(f"digits judge expects 8x8 single-channel images, got {x.shape[1]} values per image")
        return x

    def score(self, images, labels) -> DigitsScore:
        """``images``: [n, 1, 8, 8] or [n, 64] in [0, 1]; ``labels``: the classes they were drawn for."""
        x = np.clip(self._flat(images), 0.0, 1.0)
        labels = np.asarray(labels)
        pred = self.clf.predict(x)
        return DigitsScore(class_consistency=float((pred == labels).mean()),
                           frechet_distance=frechet_distance(self.features(x), self.real_features),
                           num_samples=int(len(x)))

    def reference(self, n: Optional[int] = None) -> DigitsScore:
        """The same metrics for held-out real digits (what a perfect generator would score)."""
        n = n or len(self.x_test)
        return self.score(self.x_test[:n], self.y_test[:n])
