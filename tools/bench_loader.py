#!/usr/bin/env python
"""Loader throughput: our FFCV train loader vs a plain torch DataLoader over a numpy memmap.

Both read the same synthetic KL-16-shaped latents (moments and flipped moments, float32
[32, 16, 16] each, as tools/pretokenize.py writes them for ImageNet 256) and produce the same
model tokens: one view chosen per sample, a posterior sample drawn with the per-sample noise of
:mod:`heptapod_ds.data.order`, x 0.2325, flattened to [B, 256, 16]. Prints one table.

    python tools/bench_loader.py --samples 8192 --batch 256 --workers 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def write_synthetic(directory: str, samples: int, seed: int = 0):
    """The same rows twice: an FFCV beton (with its summary) and a .npy memmap [N, 2, 32, 16, 16]."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    from heptapod_ds.data.format import FORMAT_VERSION, sha256_file, write_summary

    rng = np.random.default_rng(seed)
    views = np.lib.format.open_memmap(os.path.join(directory, "latents.npy"), mode="w+", dtype=np.float32,
                                      shape=(samples, 2, 32, 16, 16))
    for start in range(0, samples, 1024):
        chunk = rng.standard_normal((min(1024, samples - start), 2, 32, 16, 16), dtype=np.float32)
        chunk[:, :, 16:] = chunk[:, :, 16:] * 0.5 - 8.0  # plausible log-variances
        views[start:start + len(chunk)] = chunk
    views.flush()
    labels = rng.integers(0, 1000, samples)
    np.save(os.path.join(directory, "labels.npy"), labels)

    class Rows:
        def __len__(self):
            return samples

        def __getitem__(self, i):
            return views[i, 0], views[i, 1], int(labels[i]), i, i

    beton = os.path.join(directory, "latents.beton")
    field = NDArrayField(dtype=np.dtype(np.float32), shape=(32, 16, 16))
    DatasetWriter(beton, {"moments": field, "moments_flip": field, "label": IntField(), "index": IntField(),
                          "source_index": IntField()}, num_workers=2).from_indexed_dataset(Rows(), chunksize=256)
    write_summary(beton, {"format_version": FORMAT_VERSION, "count": samples, "classes": 1000, "shape": [32, 16, 16],
                          "dtype": "float32", "tokenizer": {"name": "kl16", "image_size": 256, "stride": 16,
                                                            "channels": 16, "vocab_size": 16384},
                          "file_size": os.path.getsize(beton), "sha256": sha256_file(beton)})
    return beton, os.path.join(directory, "latents.npy"), os.path.join(directory, "labels.npy")


class MemmapRows(torch.utils.data.Dataset):
    def __init__(self, path, labels):
        self.path, self.labels, self.views = path, np.load(labels), None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.views is None:
            self.views = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self.views[i])), int(self.labels[i]), i


def _collate(seed: int, epoch: int):
    from heptapod_ds.data.order import flip_choices, posterior_noise
    from heptapod_ds.tokenizers import moments_to_tokens

    def collate(items):
        views = torch.stack([v for v, _, _ in items])
        ids = np.array([i for _, _, i in items])
        flip = torch.from_numpy(flip_choices(seed, epoch, ids))
        stored = torch.where(flip.view(-1, 1, 1, 1), views[:, 1], views[:, 0])
        noise = posterior_noise(seed, epoch, ids, (16, 16, 16))
        return moments_to_tokens(stored, noise, 0.2325), torch.tensor([y for _, y, _ in items]), torch.from_numpy(ids)
    return collate


def timed(iterable, max_batches: int):
    """Samples/s over the batches after the first (which pays JIT compilation and worker start-up)."""
    it = iter(iterable)
    first = next(it)
    n, t0 = 0, time.perf_counter()
    for k, (tokens, _, _) in enumerate(it):
        n += tokens.shape[0]
        if k + 2 >= max_batches:
            break
    assert first[0].shape[1:] == (256, 16)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-batches", type=int, default=32)
    p.add_argument("--dir", default=None, help="Scratch folder (default: a temporary one).")
    args = p.parse_args(argv)
    from heptapod_ds.config import load_config
    from heptapod_ds.data import TrainLoader

    torch.set_num_threads(max(1, args.workers))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        beton, npy, labels = write_synthetic(tmp, args.samples)
        print(f"wrote {args.samples} latent pairs ({os.path.getsize(beton) / 2**20:.0f} MiB beton) in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
        cfg = load_config(overrides=["preset=B", f"data.path={beton}", f"train.micro_batch_size={args.batch}",
                                     f"train.global_batch_size={args.batch}", "train.grad_accum=1",
                                     f"data.num_workers={args.workers}"], world_size=1)
        ffcv_rate = timed(TrainLoader(beton, cfg, dp_rank=0, dp_size=1), args.max_batches)
        sampler = torch.utils.data.RandomSampler(range(args.samples), generator=torch.Generator().manual_seed(0))
        torch_loader = torch.utils.data.DataLoader(MemmapRows(npy, labels), batch_size=args.batch, sampler=sampler,
                                                   num_workers=args.workers, collate_fn=_collate(0, 0),
                                                   drop_last=True, persistent_workers=False)
        torch_rate = timed(torch_loader, args.max_batches)
    print(f"| loader (batch {args.batch}, {args.workers} workers, {args.samples} samples) | samples/s |")
    print("| --- | --- |")
    print(f"| heptapod_ds TrainLoader (FFCV beton) | {ffcv_rate:,.0f} |")
    print(f"| torch DataLoader over numpy memmap | {torch_rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
