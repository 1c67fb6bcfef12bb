"""``python -m heptapod_ds.config [--config FILE.yaml] [key.sub=value ...]``: print the resolved config."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .loader import ConfigError, field_help, load_config, to_yaml


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every entry point shares: a YAML file, overrides, and printing helpers."""
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file with config sections; applied after the preset.")
    parser.add_argument("--print-config", action="store_true",
                        help="Print the resolved config as YAML and exit.")
    parser.add_argument("--help-config", action="store_true",
                        help="List every config key with its default and meaning, then exit.")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="Overrides applied last, e.g. preset=tiny train.steps=100 parallel.tensor=2.")


def print_help_config(out=sys.stdout) -> None:
    for key, text, default in field_help():
        out.write(f"{key:32s} {str(default):>14s}  {text}\n")


def resolve_or_exit(args: argparse.Namespace, world_size: Optional[int] = None):
    """Load the config for parsed ``args``; on a config error print it and exit with status 2."""
    if args.help_config:
        print_help_config()
        sys.exit(0)
    try:
        cfg = load_config(args.config, args.overrides, world_size=world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        sys.exit(0)
    return cfg


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m heptapod_ds.config", description=__doc__)
    add_config_args(parser)
    args = parser.parse_args(argv)
    args.print_config = True
    resolve_or_exit(args)


if __name__ == "__main__":
    main()
