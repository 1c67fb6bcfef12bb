"""Improved precision and recall (Kynkäänniemi et al. 2019) as OpenAI's ADM evaluator computes them.

Definitions (ADM's ``ManifoldEstimator`` with its defaults, k = 3, no radius clamp):

* distances are squared Euclidean distances between Inception pool features;
* the *radius* of a point of a set is its (k+1)-th smallest distance to the points of its own set, the
  point itself (distance 0) included: the distance to its k-th nearest other point (a duplicate counts as
  a neighbour at distance 0);
* a point lies *in the manifold* of a set when it is within the radius of at least one of the set's
  points (``distance <= radius``);
* precision = the share of samples in the manifold of the reference set; recall = the share of
  reference points in the manifold of the samples.

Distances are computed in blocks of ``row_batch`` x ``col_batch`` (10,000 x 10,000 as in ADM), keeping
only the k+1 smallest per row while the columns stream past, so memory is bounded by one block whatever
the set sizes. ADM computes each block in float16 (float32 when float16 overflows); here blocks are
float64 by default (``|u|^2 - 2 u.v + |v|^2``, clamped at 0 as ADM does): decisions can differ from
ADM's only for pairs within float16 rounding of a radius.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

DEFAULT_K = 3
DEFAULT_BATCH = 10000


def _as_tensor(x, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 2:
        raise ValueError(f"features must be [n, d], got {tuple(t.shape)}.")
    return t.to(device=device, dtype=dtype)


def _sq_distances(u: torch.Tensor, v: torch.Tensor, u_norm: torch.Tensor, v_norm: torch.Tensor) -> torch.Tensor:
    """Squared distances [len(u), len(v)] = max(|u|^2 - 2 u.v + |v|^2, 0)."""
    return (u_norm[:, None] - 2.0 * (u @ v.T) + v_norm[None, :]).clamp_(min=0.0)


def knn_radii(features, k: int = DEFAULT_K, row_batch: int = DEFAULT_BATCH, col_batch: int = DEFAULT_BATCH,
              device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Radius (squared distance to the k-th nearest other point) of every row of ``features`` [n, d]."""
    x = _as_tensor(features, device or "cpu", dtype)
    n = x.shape[0]
    if n < k + 1:
        raise ValueError(f"the k-NN radius with k={k} needs at least {k + 1} feature vectors, got {n}.")
    norms = (x * x).sum(1)
    radii = torch.empty(n, dtype=dtype, device=x.device)
    for r0 in range(0, n, row_batch):
        rows = slice(r0, min(r0 + row_batch, n))
        best = None
        for c0 in range(0, n, col_batch):
            cols = slice(c0, min(c0 + col_batch, n))
            d = _sq_distances(x[rows], x[cols], norms[rows], norms[cols])
            d = d if best is None else torch.cat([best, d], dim=1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[rows] = best[:, k]
    return radii


@dataclass
class PrecisionRecall:
    precision: float
    recall: float
    k: int
    num_reference: int
    num_samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def precision_recall(reference, samples, k: int = DEFAULT_K, row_batch: int = DEFAULT_BATCH,
                     col_batch: int = DEFAULT_BATCH, device=None, dtype: torch.dtype = torch.float64,
                     reference_radii: Optional[torch.Tensor] = None) -> PrecisionRecall:
    """Precision and recall of ``samples`` [m, d] against ``reference`` [n, d] (pool features).

    One pass over reference x sample blocks decides both: a sample is in the reference manifold when some
    reference point's radius covers it, a reference point is in the sample manifold when some sample's
    radius covers it. ``reference_radii`` may be passed in when the same reference is scored often.
    """
    device = torch.device(device or "cpu")
    ref = _as_tensor(reference, device, dtype)
    smp = _as_tensor(samples, device, dtype)
    if ref.shape[1] != smp.shape[1]:
        raise ValueError(f"reference features have {ref.shape[1]} dimensions, samples {smp.shape[1]}: "
                         f"were both extracted with the same network?")
    r_ref = knn_radii(ref, k, row_batch, col_batch, device, dtype) if reference_radii is None \
        else reference_radii.to(device=device, dtype=dtype)
    r_smp = knn_radii(smp, k, row_batch, col_batch, device, dtype)
    ref_norm, smp_norm = (ref * ref).sum(1), (smp * smp).sum(1)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=device)   # reference covered by samples
    smp_in = torch.zeros(smp.shape[0], dtype=torch.bool, device=device)   # samples covered by reference
    for r0 in range(0, ref.shape[0], row_batch):
        rows = slice(r0, min(r0 + row_batch, ref.shape[0]))
        for c0 in range(0, smp.shape[0], col_batch):
            cols = slice(c0, min(c0 + col_batch, smp.shape[0]))
            d = _sq_distances(ref[rows], smp[cols], ref_norm[rows], smp_norm[cols])
            ref_in[rows] |= (d <= r_smp[cols][None, :]).any(dim=1)
            smp_in[cols] |= (d <= r_ref[rows][:, None]).any(dim=0)
    return PrecisionRecall(precision=float(smp_in.double().mean()), recall=float(ref_in.double().mean()), k=k,
                           num_reference=int(ref.shape[0]), num_samples=int(smp.shape[0]))
