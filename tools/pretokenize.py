#!/usr/bin/env python
"""Pre-tokenize an ImageFolder tree (ImageNet train/ or val/) into an FFCV beton.

    python tools/pretokenize.py --input /data/imagenet/train --output data/imagenet256_kl16.beton \
        --tokenizer kl16 --tokenizer-ckpt pretrained/kl16.ckpt [--size 256] [--force]
    torchrun --nproc_per_node 8 tools/pretokenize.py ...     # one shard stream per GPU

Each image is ADM-center-cropped to --size, encoded together with its horizontal flip, and stored
with its label and source index; a summary JSON is written beside the beton. Interrupted jobs
resume (finished shards are skipped); unreadable images are skipped and listed. Exit status 0 on
success, 1 with a message on bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from heptapod_ds.config.schema import CHOICES, TokenizerConfig  # noqa: E402

# Per-tokenizer settings; --size overrides image_size. pixel: 256 grey levels of 8-bit images.
TOKENIZER_DEFAULTS = {
    "kl16": dict(stride=16, channels=16, scale_factor=0.2325, vocab_size=16384),
    "vq16": dict(stride=16, channels=8, vocab_size=16384),
    "patch": dict(stride=16, channels=3 * 16 * 16),
    "pixel": dict(stride=1, channels=1, vocab_size=256),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="ImageFolder root: one sub-folder per class.")
    p.add_argument("--output", required=True, help="Beton to write (FILE.beton); FILE.beton.json is written beside.")
    p.add_argument("--tokenizer", required=True, choices=CHOICES["tokenizer.name"])
    p.add_argument("--tokenizer-ckpt", default=None, help="Local weights for kl16/vq16 (never downloaded).")
    p.add_argument("--size", type=int, default=256, help="Center-crop side in pixels (default 256).")
    p.add_argument("--stride", type=int, default=None, help="patch tokenizer only: pixels per token side.")
    p.add_argument("--force", action="store_true", help="Overwrite an existing output and discard old shards.")
    p.add_argument("--batch-size", type=int, default=64, help="Images per encoder call (plus their flips).")
    p.add_argument("--shard-size", type=int, default=10000, help="Images per resumable shard.")
    p.add_argument("--decode-workers", type=int, default=8, help="Threads decoding images per rank.")
    p.add_argument("--write-workers", type=int, default=4, help="Processes writing the beton (rank 0).")
    p.add_argument("--keep-shards", action="store_true", help="Keep FILE.beton.shards/ after merging.")
    p.add_argument("--device", default=None, help="Encoder device (default: cuda:LOCAL_RANK, else cpu).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return p.parse_args(argv)


def tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    settings = dict(TOKENIZER_DEFAULTS[args.tokenizer])
    if args.stride is not None:
        if args.tokenizer != "patch":
            raise ValueError(f"--stride applies to the patch tokenizer only; {args.tokenizer} has a fixed stride.")
        settings.update(stride=args.stride, channels=3 * args.stride ** 2)
    if args.size <= 0 or args.size % settings["stride"]:
        raise ValueError(f"--size {args.size} must be a positive multiple of the {args.tokenizer} stride "
                         f"{settings['stride']}.")
    return TokenizerConfig(name=args.tokenizer, ckpt=args.tokenizer_ckpt, image_size=args.size, **settings)


def _init_distributed():
    """A gloo group for barriers when launched on several ranks (torchrun/srun); None alone."""
    import torch.distributed as dist

    from heptapod_ds.distributed.launch_env import detect

    env = detect()
    if env.world_size == 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    from heptapod_ds.data.pretokenize import Coordinator, PretokenizeOptions, pretokenize
    from heptapod_ds.data.sources import EmptySourceError, ImageFolderSource
    from heptapod_ds.data.locking import OutputLockedError
    from heptapod_ds.tokenizers import TokenizerCheckpointError, build_tokenizer

    owns_group = False
    try:
        tok_cfg = tokenizer_config(args)
        source = ImageFolderSource(args.input, size=args.size, channels=1 if args.tokenizer == "pixel" else 3)
        tokenizer = build_tokenizer(tok_cfg)
        owns_group = _init_distributed()
        opts = PretokenizeOptions(batch_size=args.batch_size, shard_size=args.shard_size,
                                  decode_workers=args.decode_workers, write_workers=args.write_workers,
                                  force=args.force, keep_shards=args.keep_shards, progress=not args.no_progress,
                                  device=args.device)
        summary = pretokenize(source, tokenizer, tok_cfg, args.output, opts, Coordinator.from_torch())
    except (ValueError, FileExistsError, IsADirectoryError, EmptySourceError, OutputLockedError,
            TokenizerCheckpointError, RuntimeError) as e:
        print(f"pretokenize: error: {e}", file=sys.stderr)
        return 1
    finally:
        if owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()
    if summary is not None:
        print(json.dumps({k: summary[k] for k in ("count", "skipped_count", "classes", "shape", "dtype", "sha256")}))
        for item in summary["skipped"]:
            print(f"skipped {item['path']}: {item['error']}", file=sys.stderr)
        print(f"wrote {os.path.abspath(args.output)} ({summary['count']} images, {summary['skipped_count']} skipped); "
              f"summary {os.path.abspath(args.output)}.json")
    return 0


if __name__ == "__main__":
    from heptapod_ds.distributed.process_exit import exit_process

    exit_process(main())
