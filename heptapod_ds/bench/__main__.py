"""python -m heptapod_ds.bench [--quick] [--json OUT] [--only NAME[,NAME]] [--device cpu|cuda]

Runs every benchmark row in one process (the memory row spawns two gloo ranks), prints one table and
optionally writes the rows as JSON. Rows: train, head (the local head cut vs uncut), sampling, memory,
loader, gpu. ``--quick`` shrinks
repeats and sizes for CI (sized for under 3 minutes on 2 idle cores); the full run is sized for under 10.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
import warnings
from typing import Dict, List

ROWS = ("train", "head", "sampling", "memory", "loader", "gpu")
log = logging.getLogger("heptapod_ds.bench")


def _single_rank(device: str):
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.distributed.launch_env import LaunchEnv, free_port

    if not parallel_state.is_initialized():
        env = LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port(),
                        launcher="single")
        parallel_state.initialize(tensor=1, pipeline=1, backend="nccl" if device == "cuda" else "gloo", seed=0,
                                  launch=env)


def machine() -> Dict[str, object]:
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    return info


def _fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def describe(row: Dict) -> str:
    """One table line per row: the measured value, its spread, and the comparison it is about."""
    name = row["row"]
    if name.startswith("train/"):
        s = row["step_s"]
        text = (f"step {s['median'] * 1e3:,.0f} ms [{s['min'] * 1e3:,.0f}-{s['max'] * 1e3:,.0f}]  "
                f"{_fmt_rate(row['images_per_s'])} img/s  MFU {row['mfu'] * 100:.1f}%")
        if "ratio_to_reference" in row:
            r = row["ratio_to_reference"]
            text += f"  x{r['median']:.3f} of reference [{r['min']:.3f}-{r['max']:.3f}]"
        if "compile_s" in row:  # train/<preset>/compiled: ZeRO-0 with train.compile
            r, even = row["ratio_to_eager"], row["break_even_steps"]
            text += (f"  compile {row['compile_s']:.1f} s (first step), x{r['median']:.3f} of eager zero0 "
                     f"[{r['min']:.3f}-{r['max']:.3f}], pays off after "
                     f"{f'{even:,.0f} steps' if even is not None else 'never (not faster)'}")
        return text
    if name == "mfu/matmul_peak":
        return (f"fp32 matmul {row['matmul_size']}^3: {row['peak_flops_per_s'] / 1e9:,.1f} GFLOP/s "
                f"({row['threads']} threads); model {row['train_flops_per_image'] / 1e6:,.1f} MFLOP/img")
    if name == "head/tiny/local_train":
        c, u, r = row["cut_s"], row["uncut_s"], row["uncut_over_cut"]
        f, slots = row["train_flops_per_image"], row["computed_slots_per_image"]
        return (f"fwd+bwd mb {row['micro_batch']}: cut ({row['length_buckets']} buckets) {c['median'] * 1e3:,.0f} ms "
                f"[{c['min'] * 1e3:,.0f}-{c['max'] * 1e3:,.0f}], uncut {u['median'] * 1e3:,.0f} ms  uncut/cut "
                f"x{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]  slots/img {slots['cut']:.0f} vs {slots['uncut']:.0f}"
                f", train FLOPs/img {f['cut'] / 1e6:,.0f}M vs {f['uncut'] / 1e6:,.0f}M")
    if name == "head/tiny/local_sampling":
        r, f = row["uncut_over_cut"], row["head_flops_per_image"]
        return (f"batch {row['batch']}: cut {_fmt_rate(row['cut_images_per_s'])} img/s, uncut "
                f"{_fmt_rate(row['uncut_images_per_s'])} img/s  uncut/cut x{r['median']:.3f} [{r['min']:.3f}-"
                f"{r['max']:.3f}]  head FLOPs/img {f['cut'] / 1e9:.2f}G vs {f['uncut'] / 1e9:.2f}G, "
                f"tokens {'identical' if row['same_tokens'] else 'DIFFERENT'}")
    if name.startswith("sampling/"):
        text = f"{_fmt_rate(row['images_per_s'])} img/s (batch {row['batch']})"
        if "speedup_over_no_cache" in row:
            r = row["speedup_over_no_cache"]
            sh = row["time_share"]
            text += (f"  cache x{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]  time: backbone "
                     f"{sh['backbone'] * 100:.0f}% head {sh['head'] * 100:.0f}% output {sh['output'] * 100:.0f}% "
                     f"other {sh['other'] * 100:.0f}%")
        return text
    if name.startswith("memory/"):
        mib = 2 ** 20
        return (f"per rank (DP=2): params {row['params_bytes'] / mib:.2f} MiB, grads {row['grads_bytes'] / mib:.2f}, "
                f"optimizer {row['optimizer_bytes'] / mib:.2f}, total {row['total_bytes'] / mib:.2f} "
                f"= {row['fraction_of_zero0']:.2f} x ZeRO-0")
    if name.startswith("loader/"):
        f, m, r = row["ffcv_samples_per_s"], row["memmap_samples_per_s"], row["ratio"]
        need = row["h200_45pct_mfu_need"]
        return (f"ffcv {f['median']:,.0f} [{f['min']:,.0f}-{f['max']:,.0f}]  memmap {m['median']:,.0f} "
                f"[{m['min']:,.0f}-{m['max']:,.0f}]  x{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]  "
                f"{row['ffcv_per_worker']:,.0f}/worker; H200@45%: B {need['B']:,.0f}, H {need['H']:,.0f} img/s")
    if name.startswith("gpu/"):
        text = (f"{row['preset']} mb {row['micro_batch']} {row['precision']} {row['layers']}: "
                f"{_fmt_rate(row['images_per_s'])} img/s, {row['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s, "
                f"MFU vs measured matmul {row['mfu_vs_measured_matmul'] * 100:.1f}%")
        if "mfu" in row:
            text += f", vs listed peak {row['mfu'] * 100:.1f}%"
        if "memory_peak_gib" in row:
            text += f", peak {row['memory_peak_gib']:.1f} GiB"
        if "memory_predicted_gib" in row:
            text += f" (planner {row['memory_predicted_gib']:.2f} GiB)"
        if "resume_exact" in row:
            text += (f"; checkpoint {row['checkpoint_save_s']:.1f} s save / {row['checkpoint_load_s']:.1f} s load, "
                     f"resume {'exact' if row['resume_exact'] else 'NOT EXACT'}, "
                     f"sampling {row['sample_s_per_image']:.1f} s/img")
        return text
    return json.dumps(row)


def run_rows(names: List[str], quick: bool, device: str) -> List[Dict]:
    from . import gpu, loader, local_head, memory, sampling, train

    rows: List[Dict] = []
    cores = os.cpu_count() or 1
    for name in names:
        t0 = time.perf_counter()
        log.info("bench row %s ...", name)
        if name == "train":
            _single_rank("cpu")
            rows += train.run("small", micro_batch=16 if quick else 32, repeats=3 if quick else 7,
                              peak_size=512 if quick else 1024)
        elif name == "head":
            _single_rank("cpu")
            rows += local_head.run(micro_batch=32, sample_batch=8 if quick else 32, repeats=3 if quick else 7)
        elif name == "sampling":
            _single_rank("cpu")
            batch = 8 if quick else 32
            rows += sampling.run("tiny", ["preset=tiny"], batch, repeats=2 if quick else 3)
            rows += sampling.run("tiny-patch", ["preset=tiny", "tokenizer.name=patch", "tokenizer.channels=1"],
                                 batch, repeats=2 if quick else 3, num_steps=10 if quick else 50)
        elif name == "memory":
            rows += memory.run("tiny" if quick else "small", micro_batch=4)
        elif name == "loader":
            # quick: fewer, smaller batches, but as many per measurement as the full run (16): with 6, the
            # batches the memmap DataLoader prefetched during the first one were most of what was timed
            rows += loader.run(samples=2048 if quick else 8192, batch=128 if quick else 256,
                               repeats=2 if quick else 5, max_batches=16,
                               workers=list(range(1, cores + 1)))
        elif name == "gpu":
            _single_rank(device)
            rows += gpu.run(device, quick)
        log.info("bench row %s done in %.0fs", name, time.perf_counter() - t0)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heptapod_ds.bench", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI size)")
    parser.add_argument("--json", metavar="OUT", help="write the machine description and every row to this file")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help=f"run only these rows (repeat or comma-separate): {', '.join(ROWS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device of the gpu row (the other rows are CPU measurements)")
    args = parser.parse_args(argv)
    names = [n for item in (args.only or []) for n in item.split(",") if n] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}.")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda but torch sees no CUDA device; run with --device cpu.")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore")
    for noisy in ("DeepSpeed", "deepspeed", "megatron", "heptapod_ds.engine", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    env = machine()
    t0 = time.perf_counter()
    rows = run_rows(names, args.quick, args.device)
    env["wall_s"] = time.perf_counter() - t0
    env["quick"] = args.quick
    width = max(len(r["row"]) for r in rows)
    print(f"heptapod_ds.bench  {env['date']}  {env['cores']} cores  load {env['load_average_1m']}  "
          f"{env['wall_s']:.0f}s{'  (quick)' if args.quick else ''}")
    for row in rows:
        print(f"{row['row']:<{width}}  {describe(row)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": env, "rows": rows}, fh, indent=1)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    from heptapod_ds.distributed.process_exit import exit_process

    exit_process(main())
