"""Train Heptapod.

    deepspeed heptapod_ds/train.py --ds_config ds_configs/zero3.json [--config FILE.yaml] [key=value ...]
    torchrun --nproc_per_node 8 heptapod_ds/train.py ...      srun python heptapod_ds/train.py ...
    python heptapod_ds/train.py                                # CPU demo: tiny preset on the digits

The training loop itself lands with the training issue; this entry point already resolves and
validates the configuration for a launch (``--print-config``).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # started as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from heptapod_ds.config.cli import add_config_args, resolve_or_exit  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heptapod_ds/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=None,
                        help="DeepSpeed JSON config (ds_configs/*.json); same as parallel.ds_config=...")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_config_args(parser)
    return parser


def parse_config(argv=None):
    args = build_parser().parse_args(argv)
    if args.ds_config:
        args.overrides = [*args.overrides, f"parallel.ds_config={args.ds_config}"]
    return args, resolve_or_exit(args)


def main(argv=None) -> None:
    args, cfg = parse_config(argv)
    raise SystemExit("training loop not implemented yet")


if __name__ == "__main__":
    main()
