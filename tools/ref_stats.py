#!/usr/bin/env python
"""Build reference statistics (FID: mu, sigma of Inception pool features; sFID: mu_s, sigma_s of the
spatial features) from images, and optionally an ADM-layout reference batch with images.

    python tools/ref_stats.py --images DIR_OR_NPZ --out STATS.npz [--inception bundled|FILE] \
        [--center-crop 256] [--max-images N] [--batch-size 50] [--keep-images 10000]
    torchrun --nproc_per_node 8 tools/ref_stats.py ...     # each rank takes every world-th image

DIR: a folder of images (searched recursively); NPZ: ``arr_0`` uint8 [N, H, W, 3] (ADM's format);
``digits``: the embedded 8x8 digits (all 1797). For ImageNet val as in ADM's reference batch use
``--center-crop 256``. The output holds ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (float64) and ``info``
(extractor, image count, source); with ``--keep-images N`` also ``arr_0``: N of the images (evenly spaced
over the sorted list, so a class-sorted folder keeps every class), uint8 [N, H, W, 3], the layout of ADM's
VIRTUAL_*.npz, which precision/recall need. Read by ``tools/sample_fid.py --ref-stats``.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images, or .npz with arr_0 uint8 [N, H, W, 3]")
    p.add_argument("--out", required=True, help="output .npz (mu, sigma, info)")
    p.add_argument("--inception", default="bundled", help="'bundled' or a pytorch-fid/torch-fidelity weights file")
    p.add_argument("--center-crop", type=int, default=None, help="ADM-style centre crop to this square size")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--keep-images", type=int, default=0, help="also store N of the images as arr_0 (ADM's "
                   "reference batch layout; ADM keeps 10000) for precision/recall")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.evaluation import FeatureStats, save_ref_stats
    from heptapod_ds.evaluation.extractors import build_extractor
    from heptapod_ds.evaluation.image_source import ImageSource
    from heptapod_ds.monitor import get_logger
    from heptapod_ds.monitor.logger import setup_logging

    setup_logging()
    log = get_logger("ref_stats")
    try:
        source = ImageSource(args.images, crop=args.center_crop, limit=args.max_images)
        if len(source) < 2:
            raise ValueError(f"--images {args.images}: {len(source)} image(s); statistics need at least 2.")
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder; give a file name such as stats.npz.")
        if not 0 <= args.keep_images <= len(source):
            raise ValueError(f"--keep-images {args.keep_images}: between 0 and the {len(source)} images.")
    except (ValueError, FileNotFoundError) as e:
        print(f"ref_stats.py: error: {e}", file=sys.stderr)
        return 2
    info = parallel_state.initialize(tensor=1, pipeline=1, backend="auto", seed=0)
    try:
        extractor = build_extractor(args.inception, device=info.device, batch_size=args.batch_size)
        mine = range(info.rank, len(source), info.world_size)
        log.info("%d images from %s, %d on this rank, extractor %s", len(source), args.images, len(mine),
                 extractor.name)
        stats = FeatureStats(extractor.dim)
        spatial = FeatureStats(extractor.spatial_dim)
        bar = None
        if info.rank == 0 and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(mine), unit="img", desc="features", dynamic_ncols=True)
        t0 = time.time()
        for batch in source.batches(mine, args.batch_size):
            feats = extractor.features(batch, spatial=True)
            stats.add(feats["pool"])
            spatial.add(feats["spatial"])
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        stats.all_reduce()
        spatial.all_reduce()
        if info.rank == 0:
            mu, sigma = stats.mean_cov()
            mu_s, sigma_s = spatial.mean_cov()
            meta = {"extractor": extractor.name, "count": stats.count,
                    "images": args.images if args.images == "digits" else os.path.abspath(args.images),
                    "center_crop": args.center_crop, "spatial": "mixed_6/conv[..., :7], NHWC, 2023 values"}
            if args.keep_images:
                from heptapod_ds.evaluation.reference import write_reference_batch

                keep = [i * len(source) // args.keep_images for i in range(args.keep_images)]
                first = next(source.batches(keep[:1], 1))
                meta["kept_images"] = {"count": args.keep_images, "rule": "index i * count // N"}
                write_reference_batch(args.out, mu, sigma, mu_s, sigma_s, meta,
                                      source.batches(keep, args.batch_size), args.keep_images, first.shape[1:])
            else:
                save_ref_stats(args.out, mu, sigma, meta, mu_s=mu_s, sigma_s=sigma_s)
            log.info("wrote %s (%d images, %d kept, %.1fs)", args.out, stats.count, args.keep_images,
                     time.time() - t0)
    finally:
        parallel_state.destroy()
    return 0


if __name__ == "__main__":
    from heptapod_ds.distributed.process_exit import exit_process

    exit_process(main())
