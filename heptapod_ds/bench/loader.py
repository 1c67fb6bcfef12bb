"""Loader rows: our FFCV TrainLoader vs a torch DataLoader over a numpy memmap, for KL-16-shaped
latents and for VQ codes, at every worker count from 1 to the machine's cores.

Both produce the same model tokens with the same guarantees: one view per sample (image or flip, a
function of (seed, epoch, index)), and for latents the posterior sample with the per-sample noise of
:mod:`heptapod_ds.data.posterior` (the memmap loader runs the same compiled kernel in its workers'
collate, so the comparison is about reading and batching, not about a slower noise). The two run
alternately, repeat by repeat; each repeat times the batches after the first (worker start-up).
The target: the samples/s one H200 consumes at 45% MFU for presets B and H.
"""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

log = logging.getLogger(__name__)

H200_BF16_PEAK = 989e12
KINDS = {"kl16": {"shape": (32, 16, 16), "dtype": np.float32},
         "vq16": {"shape": (16, 16), "dtype": np.int16}}


def write_synthetic(directory: str, kind: str, samples: int, seed: int = 0):
    """The same rows twice: an FFCV beton with its summary, and a .npy memmap [N, 2, *shape] + labels."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    from heptapod_ds.data.ffcv_compat import ensure_patched
    from heptapod_ds.data.format import FORMAT_VERSION, sha256_file, view_fields, write_summary

    ensure_patched()
    spec = KINDS[kind]
    rng = np.random.default_rng(seed)
    path = os.path.join(directory, f"{kind}.npy")
    views = np.lib.format.open_memmap(path, mode="w+", dtype=spec["dtype"], shape=(samples, 2, *spec["shape"]))
    for start in range(0, samples, 1024):
        n = min(1024, samples - start)
        if kind == "kl16":
            chunk = rng.standard_normal((n, 2, *spec["shape"]), dtype=np.float32)
            chunk[:, :, 16:] = chunk[:, :, 16:] * 0.5 - 8.0   # plausible log-variances
        else:
            chunk = rng.integers(0, 16384, (n, 2, *spec["shape"]), dtype=np.int16)
        views[start:start + n] = chunk
    views.flush()
    labels = rng.integers(0, 1000, samples)
    np.save(os.path.join(directory, f"{kind}_labels.npy"), labels)

    class Rows:
        def __len__(self):
            return samples

        def __getitem__(self, i):
            return views[i, 0], views[i, 1], int(labels[i]), i, i

    beton = os.path.join(directory, f"{kind}.beton")
    field = NDArrayField(dtype=np.dtype(spec["dtype"]), shape=spec["shape"])
    names = view_fields(kind == "vq16")
    DatasetWriter(beton, {names[0]: field, names[1]: field, "label": IntField(), "index": IntField(),
                          "source_index": IntField()}, num_workers=1).from_indexed_dataset(Rows(), chunksize=256)
    write_summary(beton, {"format_version": FORMAT_VERSION, "count": samples, "classes": 1000,
                          "shape": list(spec["shape"]), "dtype": np.dtype(spec["dtype"]).name,
                          "tokenizer": {"name": kind, "image_size": 256, "stride": 16, "channels": 16,
                                        "vocab_size": 16384},
                          "file_size": os.path.getsize(beton), "sha256": sha256_file(beton)})
    return beton, path, os.path.join(directory, f"{kind}_labels.npy")


class MemmapRows(torch.utils.data.Dataset):
    """Row i of the memmap: both views, the label and the index (the file opens lazily per worker)."""

    def __init__(self, path, labels):
        self.path, self.labels, self.views = path, np.load(labels), None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.views is None:
            self.views = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self.views[i])), int(self.labels[i]), i


class Collate:
    """Same tokens as the TrainLoader: the flip choice and the posterior noise of (seed, epoch, index)."""

    def __init__(self, kind: str, seed: int = 0, epoch: int = 0):
        self.kind, self.seed, self.epoch = kind, seed, epoch

    def __call__(self, items):
        from heptapod_ds.data.order import flip_choices, noise_keys
        from heptapod_ds.data.posterior import posterior_tokens
        from heptapod_ds.tokenizers.base import codes_to_tokens

        views = torch.stack([v for v, _, _ in items])
        ids = np.array([i for _, _, i in items])
        flips = flip_choices(self.seed, self.epoch, ids)
        labels = torch.tensor([y for _, y, _ in items])
        if self.kind == "vq16":
            mask = torch.from_numpy(flips).view(-1, 1, 1)
            tokens = codes_to_tokens(torch.where(mask, views[:, 1], views[:, 0]))
        else:
            tokens = posterior_tokens(views[:, 0], views[:, 1], flips, noise_keys(self.seed, self.epoch, ids), 0.2325)
        return tokens, labels, torch.from_numpy(ids)


def _rate(iterable, max_batches: int) -> float:
    """Samples/s over the batches after the first (which pays worker start-up and compilation)."""
    it = iter(iterable)
    next(it)
    n, t0 = 0, time.perf_counter()
    for k, (tokens, _, _) in enumerate(it):
        n += tokens.shape[0]
        if k + 2 >= max_batches:
            break
    dt = time.perf_counter() - t0
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return n / dt


def consumption() -> Dict[str, float]:
    """Images/s one H200 trains at 45% MFU for presets B and H (FLOPs from the model's accounting)."""
    from heptapod_ds.config import load_config
    from heptapod_ds.cost.flops import train_flops_per_image

    out = {}
    for preset in ("B", "H"):
        cfg = load_config(overrides=[f"preset={preset}"], world_size=1, validate_config=False)
        out[preset] = 0.45 * H200_BF16_PEAK / train_flops_per_image(cfg)
    return out


def run(samples: int, batch: int, repeats: int, max_batches: int, workers: List[int]) -> List[Dict]:
    from heptapod_ds.config import load_config
    from heptapod_ds.data import TrainLoader

    need = consumption()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("kl16", "vq16"):
            t0 = time.perf_counter()
            beton, npy, labels = write_synthetic(tmp, kind, samples)
            log.info("loader: wrote %d %s rows in %.1fs", samples, kind, time.perf_counter() - t0)
            tok = ([] if kind == "kl16" else ["tokenizer.name=vq16", "tokenizer.channels=16",
                                              "tokenizer.vocab_size=16384"])
            for w in workers:
                cfg = load_config(overrides=["preset=B", *tok, f"data.path={beton}", f"train.micro_batch_size={batch}",
                                             f"train.global_batch_size={batch}", "train.grad_accum=1",
                                             f"data.num_workers={w}", "data.random_flip=true"], world_size=1)
                ffcv_loader = TrainLoader(beton, cfg, dp_rank=0, dp_size=1)
                sampler = torch.utils.data.RandomSampler(range(samples), generator=torch.Generator().manual_seed(0))
                torch_loader = torch.utils.data.DataLoader(MemmapRows(npy, labels), batch_size=batch, sampler=sampler,
                                                           num_workers=w, collate_fn=Collate(kind), drop_last=True)
                rates = {"ffcv": [], "memmap": []}
                _rate(ffcv_loader, 2)  # compile FFCV's pipeline once, outside the timed repeats
                for _ in range(repeats):
                    rates["ffcv"].append(_rate(ffcv_loader, max_batches))
                    rates["memmap"].append(_rate(torch_loader, max_batches))
                ratios = [a / b for a, b in zip(rates["ffcv"], rates["memmap"])]
                ffcv_med = statistics.median(rates["ffcv"])
                rows.append({"row": f"loader/{kind}/workers{w}", "batch": batch, "workers": w,
                             "ffcv_samples_per_s": {"median": ffcv_med, "min": min(rates["ffcv"]),
                                                    "max": max(rates["ffcv"])},
                             "memmap_samples_per_s": {"median": statistics.median(rates["memmap"]),
                                                      "min": min(rates["memmap"]), "max": max(rates["memmap"])},
                             "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
                             "ffcv_per_worker": ffcv_med / w,
                             "h200_45pct_mfu_need": need,
                             "covers": {p: ffcv_med >= v for p, v in need.items()}})
    return rows
