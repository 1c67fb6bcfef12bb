"""An ablation grid: named variants (config overrides) x seeds, read from YAML and expanded to runs.

    name: heads_digits                # optional; default: the file's stem
    base: {preset: tiny, eval.every: 50}          # overrides for every variant
    seeds: [0, 1]                     # every variant runs once per seed
    seed_keys: [train.seed, data.seed]            # the config keys a seed sets (this is the default)
    quick: {train.steps: 20}          # applied last with --quick, which also keeps only the first seed
    variants:
      next: {head.type: next}
      global_T4_K8: {head: {type: global, timesteps: 4, supervised: 8}}

Overrides are dotted keys (``head.type``) or nested mappings, exactly the keys of
``python -m heptapod_ds.config --help-config``. Every run's config is resolved and validated when the
grid is loaded, so a typo stops the tool before any run starts.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from heptapod_ds.config import ConfigError

DEFAULT_SEED_KEYS = ("train.seed", "data.seed")
RESERVED_KEYS = ("run_dir",)  # the tool gives every run its own directory
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_TOP_KEYS = ("name", "description", "base", "seeds", "seed_keys", "quick", "variants")


class GridError(ValueError):
    """A grid file that cannot be run; the message says what to change."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid: a variant at one seed, with its own run directory."""

    variant: str
    seed: int
    overrides: Tuple[str, ...]  # key=value, in the order train.py applies them
    run_dir: str

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    def override_dict(self) -> Dict[str, str]:
        return dict(o.split("=", 1) for o in self.overrides)


@dataclass
class Grid:
    name: str
    path: str
    description: str
    base: Dict[str, Any]
    seeds: List[int]
    seed_keys: List[str]
    quick: Dict[str, Any]
    variants: Dict[str, Dict[str, Any]]  # insertion order = report order
    extra: Dict[str, Any] = field(default_factory=dict)  # command-line overrides for every run

    def restrict_seeds(self, seeds: Sequence[int]) -> None:
        """Keep only ``seeds`` (each must be one of the grid's)."""
        unknown = [s for s in seeds if s not in self.seeds]
        if unknown or not seeds:
            raise GridError(f"--seeds {list(seeds)}: the grid's seeds are {self.seeds}; pick among them.")
        self.seeds = [s for s in self.seeds if s in seeds]

    def variants_as_strings(self) -> Dict[str, Dict[str, str]]:
        return {v: {k: format_value(x) for k, x in o.items()} for v, o in self.variants.items()}

    def runs(self, out_dir: str, quick: bool = False) -> List[RunSpec]:
        """Every (variant, seed) run, variants in file order, seeds inner; directories under ``out_dir``."""
        seeds = self.seeds[:1] if quick else self.seeds
        specs = []
        for variant, overrides in self.variants.items():
            for seed in seeds:
                merged: Dict[str, Any] = {}
                for part in (self.base, overrides, self.quick if quick else {}, self.extra):
                    merged.update(part)
                merged.update({k: seed for k in self.seed_keys})
                items = tuple(f"{k}={format_value(v)}" for k, v in merged.items())
                specs.append(RunSpec(variant, seed, items, os.path.join(out_dir, variant, f"seed{seed}")))
        return specs


def format_value(value: Any) -> str:
    """A YAML value as train.py's ``key=value`` reads it back (booleans and null in YAML spelling)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise GridError(f"override value {value!r} is a {type(value).__name__}; config values are numbers, "
                    f"strings, booleans or null.")


def flatten(data: Any, where: str, prefix: str = "") -> Dict[str, Any]:
    """``{head: {type: next}}`` and ``{head.type: next}`` -> ``{"head.type": "next"}``."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GridError(f"{where}: expected a mapping of config overrides (e.g. head.type: next), got "
                        f"{type(data).__name__} {data!r}.")
    out: Dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if isinstance(value, dict):
            out.update(flatten(value, where, dotted + "."))
        else:
            out[dotted] = value
    return out


def load_grid(path: str, extra: Sequence[str] = ()) -> Grid:
    """Read and check a grid file; ``extra`` are ``key=value`` overrides for every run (the command line)."""
    if not os.path.isfile(path):
        raise GridError(f"grid file '{path}' does not exist; see experiments/heads_digits.yaml for an example.")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise GridError(f"grid file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise GridError(f"grid file '{path}' must hold a mapping with at least 'variants', got "
                        f"{type(data).__name__}.")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(_TOP_KEYS)}.")

    name = str(data.get("name") or os.path.splitext(os.path.basename(path))[0])
    if not _NAME.match(name):
        raise GridError(f"{path}: name '{name}' may only use letters, digits and _ . + - (it names directories).")

    seeds = data.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise GridError(f"{path}: seeds must be a non-empty list of integers >= 0, e.g. seeds: [0, 1, 2]; "
                        f"got {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"{path}: seeds {seeds} repeat a value; each seed must be listed once.")

    seed_keys = data.get("seed_keys", list(DEFAULT_SEED_KEYS))
    if isinstance(seed_keys, str):
        seed_keys = [seed_keys]
    if not isinstance(seed_keys, list) or not all(isinstance(k, str) for k in seed_keys):
        raise GridError(f"{path}: seed_keys must be a list of config keys, e.g. [train.seed, data.seed].")

    variants_raw = data.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise GridError(f"{path}: 'variants' must map variant names to config overrides, e.g.\n"
                        f"  variants:\n    next: {{head.type: next}}\n    global: {{head.type: global}}")
    variants = {}
    for vname, overrides in variants_raw.items():
        vname = str(vname)
        if not _NAME.match(vname):
            raise GridError(f"{path}: variant name '{vname}' may only use letters, digits and _ . + - "
                            f"(it names a directory).")
        variants[vname] = flatten(overrides, f"{path}: variant '{vname}'")

    base = flatten(data.get("base"), f"{path}: base")
    quick = flatten(data.get("quick"), f"{path}: quick")
    extra_d = _parse_extra(extra)
    for where, part in [("base", base), ("quick", quick), ("command line", extra_d)] + \
            [(f"variant '{v}'", o) for v, o in variants.items()]:
        for key in part:
            if key in RESERVED_KEYS:
                raise GridError(f"{path}: {where} sets '{key}'; the tool gives every run its own directory "
                                f"(--out/<variant>/seed<N>), remove it.")
            if key in seed_keys:
                raise GridError(f"{path}: {where} sets '{key}', which the grid's seeds set (seed_keys); list the "
                                f"seeds under 'seeds:' instead.")
    grid = Grid(name=name, path=path, description=str(data.get("description") or "").strip(), base=base,
                seeds=list(seeds), seed_keys=list(seed_keys), quick=quick, variants=variants, extra=extra_d)
    return grid


def _parse_extra(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise GridError(f"command-line override '{item}' is not of the form key.sub=value (e.g. train.steps=100).")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
    return out


def resolve(spec: RunSpec, world_size: Optional[int] = None):
    """The validated config of one run (what train.py will run), or a GridError naming the run."""
    from heptapod_ds.config import load_config, validate

    try:
        cfg = load_config(None, [*spec.overrides, f"run_dir={spec.run_dir}"], validate_config=False)
        return validate(cfg, world_size=world_size or cfg.parallel.world_size or cfg.parallel.model_parallel)
    except ConfigError as e:
        raise GridError(f"run {spec.name}: {e}") from None


def check_runs(specs: Sequence[RunSpec], world_size: Optional[int] = None) -> Dict[str, Any]:
    """Resolve every run's config up front (a typo in the grid fails before anything runs)."""
    return {spec.name: resolve(spec, world_size) for spec in specs}
