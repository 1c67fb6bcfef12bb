"""Will it fit, and how long will it take? The capacity planner of a Heptapod config.

    python -m heptapod_ds.plan preset=H --gpus 128                  # 16 nodes x 8 GPUs, 80 GiB each
    python -m heptapod_ds.plan --config run.yaml parallel.tensor=2 --gpus 64 --gpu-memory-gib 141
    python -m heptapod_ds.plan preset=B --gpus 8 --json plan.json   # the numbers as JSON too

For the most loaded rank it gives parameters, gradients, optimizer states (ZeRO over the data-parallel
group, TP division of sharded layers), activations of the in-flight micro-batches (by part, with the
recompute setting and the attention kernel), buffers and the total; then whether it fits the GPU
(after a stated allocator margin), the largest micro batch per recompute setting, the step time at the
given MFU (plus the 1F1B bubble), images/s, days for the epochs and the GPU-hours of an FID-50K.
Everything is analytic (heptapod_ds.cost), validated on CPU against exact measurement.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

log = logging.getLogger("heptapod_ds.plan")


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def format_plan(plan) -> str:
    r = plan["per_rank"]
    rc = plan["recompute"]
    rec = rc["granularity"] if rc["granularity"] != "full" else f"full/{rc['method']}/{rc['num_layers']}"
    lines = [f"Heptapod-{plan['preset']} on {plan['gpus']} GPUs x {plan['gpu_memory_gib']:g} GiB: TP={plan['tensor']} "
             f"PP={plan['pipeline']} DP={plan['data_parallel']} ZeRO-{plan['zero_stage']}, {plan['precision']}, "
             f"micro batch {plan['micro_batch']} x accum {plan['grad_accum']} = global {plan['global_batch']}, "
             f"recompute {rec} ({rc['parts']})",
             f"{'per rank (GiB)':<34}{'value':>10}"]
    rows = [("parameters", r["params_bytes"]), ("gradients", r["grads_bytes"]),
            ("optimizer states", r["optimizer_bytes"]),
            (f"activations ({r['inflight_microbatches']} micro-batch in flight)", r["activations_bytes"]),
            ("  backbone", r["activations_by_part"]["backbone"]), ("  head", r["activations_by_part"]["head"]),
            ("  output", r["activations_by_part"]["output"]), ("buffers (buckets, ZeRO-3 live)", r["buffers_bytes"]),
            ("total", r["total_bytes"]), ("usable (after margin)", plan["usable_bytes"])]
    lines += [f"{name:<34}{_gib(v):>10}" for name, v in rows]
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"verdict: {verdict} (headroom {plan['headroom']:.0%} of the device; margin: {plan['margin']})")
    lines.append("largest micro batch that fits: " + ", ".join(f"{k} {v}" for k, v in plan["largest_micro_batch"].items()))
    lines.append(f"step {plan['step_time_s']:.2f} s at {plan['mfu']:.0%} MFU of {plan['peak_tflops']:g} TFLOP/s "
                 f"(bubble {plan['pipeline_bubble']:.1%}) -> {plan['images_per_s']:.0f} images/s, "
                 f"{plan['days']:.1f} days for {plan['epochs']:g} epochs of {plan['dataset_size']} images; "
                 f"FID-50K sampling {plan['fid50k_gpu_hours']:.1f} GPU-hours")
    if not plan["fits"]:
        lines.append("to make it fit: " + "; or ".join(plan["advice"]))
    return "\n".join(lines)


def plan_for(config_file: Optional[str], overrides: Sequence[str], gpus: Optional[int], **kwargs):
    from heptapod_ds.config.loader import load_config
    from heptapod_ds.cost.plan import make_plan

    # the planner shows a config that does not fit instead of refusing it: no start-up memory check here
    cfg = load_config(config_file, overrides=list(overrides) + ["parallel.gpu_memory_gib=0"], world_size=gpus)
    return cfg, make_plan(cfg, **kwargs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heptapod_ds.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config file (as for training)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. preset=H parallel.tensor=2")
    parser.add_argument("--gpus", type=int, default=None, help="world size (default: the config's / launcher's)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation (default 0.40)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of one GPU (default 989: H100/H200 SXM)")
    parser.add_argument("--epochs", type=float, default=800, help="epochs for the days estimate (default 800)")
    parser.add_argument("--dataset-size", type=int, default=1281167, help="images per epoch (default ImageNet-1k)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON to OUT ('-': stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import warnings
    warnings.filterwarnings("ignore")
    from heptapod_ds.config.loader import ConfigError

    try:
        _, plan = plan_for(args.config, args.overrides, args.gpus, gpu_memory_gib=args.gpu_memory_gib, mfu=args.mfu,
                           epochs=args.epochs, dataset_size=args.dataset_size, peak_tflops=args.peak_tflops)
    except ConfigError as e:
        parser.error(str(e))
    if args.json == "-":
        sys.stdout.write(json.dumps(plan, indent=2) + "\n")
        return 0
    sys.stdout.write(format_plan(plan) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(plan, fh, indent=2)
        log.info("plan written to %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
