"""The training loader: FFCV over a pre-tokenized beton, one disjoint share per data-parallel rank.

``build_train_loader(cfg, dp_rank, dp_size, start_epoch, start_step)`` returns a
:class:`TrainLoader`; iterating it yields ONE epoch from ``start_step``::

    for tokens, labels, sample_ids in loader:   # tokens [B, N, C] float or [B, N] long
        ...
    loader.set_epoch(epoch + 1)                 # then iterate again (one loader for the whole run)

Order, view choice (image or its flip) and posterior noise are functions of (data.seed, epoch,
sample index) only (see :mod:`.order`); a step is one micro batch of ``train.micro_batch_size``.
FFCV's own ``distributed=True`` shards by *global* rank, which is wrong under tensor/pipeline
parallelism; here each DP rank hands FFCV its own explicit index list instead.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..config.schema import HeptapodConfig
from ..tokenizers.base import codes_to_tokens
from .format import INDEX, LABEL, SOURCE_INDEX, open_reader, view_fields
from .order import flip_choices, global_batches_per_epoch, noise_keys, rank_epoch_indices
from .posterior import posterior_tokens
from .ffcv_compat import ensure_patched as ensure_ffcv_patched

log = logging.getLogger(__name__)


_IDLE_FFCV: Dict[tuple, List[object]] = {}
"""Compiled FFCV loaders not iterating right now, by (beton, batch, workers, token kind, flip)."""


class _ExplicitOrder:
    """An FFCV traversal order that returns the rows it is given, for every epoch."""

    def __init__(self, ffcv_loader):
        self.rows = np.asarray(ffcv_loader.indices)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.rows


class TrainLoader:
    """One data-parallel rank's batches of one epoch at a time; see the module docstring."""

    def __init__(self, beton: str, cfg: HeptapodConfig, dp_rank: int, dp_size: int, start_epoch: int = 0,
                 start_step: int = 0):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size}).")
        if cfg.train.grad_accum < 1:
            raise ValueError(f"train.grad_accum={cfg.train.grad_accum}: resolve it first with "
                             f"heptapod_ds.config.load_config / validate (0 means 'derive from the global batch').")
        self.beton = beton
        self.num_samples = int(open_reader(beton).num_samples)
        self.micro_batch = cfg.train.micro_batch_size
        self.grad_accum = cfg.train.grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = cfg.data.seed
        self.drop_last = cfg.data.drop_last
        self.random_flip = cfg.data.random_flip
        self.num_workers = max(1, cfg.data.num_workers)
        self.is_discrete = cfg.tokenizer.is_discrete
        self.scale_factor = cfg.tokenizer.scale_factor
        self.global_batch = self.micro_batch * self.grad_accum * dp_size
        if global_batches_per_epoch(self.num_samples, self.global_batch, self.drop_last) == 0:
            raise ValueError(f"beton {beton} holds {self.num_samples} samples, fewer than one global batch of "
                             f"{self.global_batch} (micro {self.micro_batch} x accum {self.grad_accum} x dp "
                             f"{dp_size}) with data.drop_last=true; lower the batch size or set data.drop_last=false.")
        self.steps_per_epoch = (global_batches_per_epoch(self.num_samples, self.global_batch, self.drop_last)
                                * self.grad_accum)
        self.epoch, self.start_step = 0, 0
        self.set_epoch(start_epoch, start_step)

    # ------------------------------------------------------------------ position
    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch the next iteration yields, starting at micro step ``start_step``."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0.")
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} must lie in [0, steps_per_epoch={self.steps_per_epoch}]; "
                             f"steps count this rank's micro batches of {self.micro_batch}.")
        self.epoch, self.start_step = epoch, start_step

    def epoch_indices(self, epoch: Optional[int] = None) -> np.ndarray:
        """Rows this rank reads in ``epoch`` (all steps), [steps_per_epoch, micro_batch]."""
        e = self.epoch if epoch is None else epoch
        idx = rank_epoch_indices(self.num_samples, self.seed, e, self.micro_batch, self.grad_accum, self.dp_rank,
                                 self.dp_size, self.drop_last)
        return idx.reshape(self.steps_per_epoch, self.micro_batch)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    # ------------------------------------------------------------------ iteration
    def _pool_key(self) -> tuple:
        return (self.beton, self.micro_batch, self.num_workers, self.is_discrete, self.random_flip)

    def _ffcv_loader(self, indices: np.ndarray):
        """An FFCV loader pointed at ``indices``: taken from the idle pool, or built (JIT, seconds).

        FFCV 1.0.2 fixes a loader's order at construction and offers no per-epoch index list, so the
        traversal order is replaced by :class:`_ExplicitOrder` and its rows are set before each epoch.
        Finished iterations return their loader to ``_IDLE_FFCV`` so that a trainer that builds a new
        TrainLoader per epoch does not recompile FFCV's pipeline every epoch.
        """
        ensure_ffcv_patched()
        from ffcv.loader import Loader, OrderOption

        idle = _IDLE_FFCV.get(self._pool_key(), [])
        if idle:
            ffcv = idle.pop()
        else:
            views = view_fields(self.is_discrete)
            pipelines = {SOURCE_INDEX: None}
            if not self.random_flip:
                pipelines[views[1]] = None
            ffcv = Loader(self.beton, batch_size=self.micro_batch, num_workers=self.num_workers,
                          order=OrderOption.SEQUENTIAL, indices=indices, pipelines=pipelines, drop_last=False,
                          seed=0, batches_ahead=2)
            ffcv.traversal_order = _ExplicitOrder(ffcv)
        ffcv.traversal_order.rows = indices
        ffcv.first_traversal_order = indices  # FFCV's len() (batches per epoch) reads this
        return ffcv

    def _release(self, ffcv) -> None:
        idle = _IDLE_FFCV.setdefault(self._pool_key(), [])
        if len(idle) < 2:
            idle.append(ffcv)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_step
        expected = self.epoch_indices(epoch)[start:]
        if len(expected) == 0:
            return
        ffcv = self._ffcv_loader(expected.reshape(-1).astype(np.uint64))
        names = list(ffcv.pipeline_specs)  # FFCV yields fields in this order
        view_names = view_fields(self.is_discrete)
        iterator = iter(ffcv)
        try:
            for step, batch in enumerate(iterator):
                fields = dict(zip(names, batch))
                ids = fields[INDEX].reshape(-1).long().clone()
                if not np.array_equal(ids.numpy(), expected[step]):
                    raise RuntimeError(f"FFCV returned rows {ids[:4].tolist()}... at step {start + step} of epoch "
                                       f"{epoch}, expected {expected[step][:4].tolist()}...; the beton's index "
                                       f"field does not match its rows (re-run tools/pretokenize.py).")
                labels = fields[LABEL].reshape(-1).long().clone()
                flips = flip_choices(self.seed, epoch, expected[step]) if self.random_flip else None
                second = fields[view_names[1]] if self.random_flip else None
                yield self._to_tokens(fields[view_names[0]], second, flips, epoch, expected[step]), labels, ids
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            self._release(ffcv)

    def _to_tokens(self, stored: torch.Tensor, flipped: Optional[torch.Tensor], flips: Optional[np.ndarray],
                   epoch: int, indices: np.ndarray) -> torch.Tensor:
        """Each sample's view (``flipped`` where ``flips``) as model tokens; latents get their posterior
        noise of (seed, epoch, index) in one compiled pass (:mod:`.posterior`)."""
        if self.is_discrete:
            if flips is not None:
                mask = torch.from_numpy(flips).view(-1, *([1] * (stored.dim() - 1)))
                stored = torch.where(mask, flipped, stored)
            return codes_to_tokens(stored)
        return posterior_tokens(stored, flipped, flips, noise_keys(self.seed, epoch, indices), self.scale_factor)


def build_train_loader(cfg: HeptapodConfig, dp_rank: int, dp_size: int, start_epoch: int = 0,
                       start_step: int = 0) -> TrainLoader:
    """The loader of ``cfg``'s dataset for one DP rank (digits are built/cached on first use)."""
    from .datasets import ensure_dataset

    return TrainLoader(ensure_dataset(cfg), cfg, dp_rank, dp_size, start_epoch, start_step)
