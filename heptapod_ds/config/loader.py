"""Build a :class:`HeptapodConfig` from preset -> YAML file -> ``key.sub=value`` overrides.

Everything that can be checked without a process group or a tensor is checked here, once; every
problem is reported in one :class:`ConfigError` whose lines say what is wrong and how to fix it.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from .presets import PRESETS
from .schema import CHOICES, HeptapodConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""


# --------------------------------------------------------------------------- introspection

def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def field_help(cls=HeptapodConfig, prefix: str = "") -> List[Tuple[str, str, Any]]:
    """(dotted key, help line, default) for every leaf field, for ``--help-config``."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            rows.extend(field_help(t, prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append((prefix + f.name, f.metadata.get("help", ""), default))
    return rows


def all_keys(cls=HeptapodConfig) -> List[str]:
    """Every dotted leaf key of the config, e.g. ``backbone.width``."""
    return [key for key, _, _ in field_help(cls)]


def _suggest(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _suggest_key(key: str) -> str:
    """Closest valid dotted key(s) for an unknown ``key``, by its last part first.

    ``resume`` names the leaf ``checkpoint.resume``; ``seed`` the leaves of three sections, all offered;
    ``train.stpes`` is a typo of ``train.steps``; ``warmup`` a part of ``schedule.warmup_steps``. Only then
    the whole dotted name is compared."""
    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    section = key.rsplit(".", 1)[0] if "." in key else ""
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if not same_leaf:
        by_leaf: Dict[str, List[str]] = {}
        for k in keys:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        close = difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75)
        if not close and len(leaf) >= 3:  # a part of a name: warmup -> warmup_steps
            close = [name for name in by_leaf if leaf in name.split("_")]
        same_leaf = [k for c in close for k in by_leaf[c]]
    in_section = [k for k in same_leaf if section and k.startswith(section + ".")]
    picks = in_section or same_leaf
    if picks:
        if len(picks) == 1:
            return f" Did you mean '{picks[0]}'?"
        return " Did you mean one of " + ", ".join(f"'{k}'" for k in picks[:4]) + "?"
    return _suggest(key, keys)


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t).replace("typing.", ""))


def _coerce(key: str, value: Any, t) -> Any:
    """Check ``value`` against the annotated type ``t``; ints are accepted for floats."""
    origin = typing.get_origin(t)
    if origin is typing.Union:
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if t is str and key.endswith("pipeline_split") and isinstance(value, list):
        return ",".join(str(v) for v in value)  # YAML: pipeline_split: [6, 6, 4, 4]
    if t is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got bool {value!r}.")
    if isinstance(value, t):
        return value
    raise ConfigError(f"{key}: expected {_type_name(t)}, got {type(value).__name__} {value!r}. "
                      f"Write e.g. {key}={_example(t)}.")


def _example(t) -> str:
    return {int: "8", float: "0.5", bool: "true", str: "name"}.get(t, "...")


# --------------------------------------------------------------------------- merging

def _merge_dict(cfg, data: Dict[str, Any], prefix: str = "") -> None:
    """Apply a nested dict onto the dataclass instance ``cfg`` in place, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}.")
    hints = _hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'.{_suggest_key(dotted)} "
                              f"Run `python -m heptapod_ds.config --help-config` for all keys.")
        t = hints[key]
        if dataclasses.is_dataclass(t):
            _merge_dict(getattr(cfg, key), value, dotted + ".")
        else:
            setattr(cfg, key, _coerce(dotted, value, t))


def parse_override(item: str) -> Tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, parsed value). Values are read as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value (e.g. train.steps=100).")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if key not in all_keys():
        raise ConfigError(f"unknown config key '{key}'.{_suggest_key(key)} "
                          f"Run `python -m heptapod_ds.config --help-config` for all keys.")
    t = _leaf_type(key)
    if t is str or t == Optional[str]:
        value: Any = None if (t != str and raw.lower() in ("null", "none", "~")) else raw
    else:
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': cannot parse value: {e}") from None
    return key, value


def _leaf_type(key: str):
    cls = HeptapodConfig
    parts = key.split(".")
    for p in parts[:-1]:
        cls = _hints(cls)[p]
    return _hints(cls)[parts[-1]]


def _nest(key: str, value: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: Dict[str, Any]) -> HeptapodConfig:
    """Rebuild a config saved with :func:`to_dict` (e.g. from a checkpoint), checking keys and types."""
    cfg = HeptapodConfig()
    _merge_dict(cfg, data)
    return cfg


# --------------------------------------------------------------------------- entry point

def load_config(config_file: Optional[str] = None, overrides: Sequence[str] = (),
                world_size: Optional[int] = None, validate_config: bool = True) -> HeptapodConfig:
    """Resolve preset, YAML file and overrides into a validated config.

    The preset is taken from the overrides if given there, else from the file, else ``tiny``; its
    values are applied first so that both the file and the command line can refine them.
    """
    file_data: Dict[str, Any] = {}
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file '{config_file}' does not exist. Pass an existing YAML file "
                              f"to --config, or drop --config to use the preset alone.")
        with open(config_file) as fh:
            try:
                file_data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file '{config_file}' is not valid YAML: {e}") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file '{config_file}' must hold a mapping of sections, "
                              f"got {type(file_data).__name__}.")
    parsed = [parse_override(o) for o in overrides]

    preset = file_data.get("preset", "tiny")
    for key, value in parsed:
        if key == "preset":
            preset = value
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'. Choose one of: {', '.join(PRESETS)}.")

    cfg = HeptapodConfig()
    _merge_dict(cfg, PRESETS[preset])
    _merge_dict(cfg, file_data)
    for key, value in parsed:
        _merge_dict(cfg, _nest(key, value))
    cfg.preset = preset
    if validate_config:
        validate(cfg, world_size=world_size)
    return cfg


def launcher_world_size() -> int:
    """World size announced by torchrun / the deepspeed launcher / srun, or 1."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


# --------------------------------------------------------------------------- validation

def validate(cfg: HeptapodConfig, world_size: Optional[int] = None) -> HeptapodConfig:
    """Check every cross-field constraint; resolve ``train.grad_accum=0`` (auto). Raises ConfigError."""
    errors: List[str] = []
    err = errors.append

    for key, allowed in CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            err(f"{key}='{value}' is not one of {', '.join(map(str, allowed))}.{_suggest(str(value), allowed)}")

    positive = ["backbone.depth", "backbone.width", "backbone.num_heads", "head.depth", "head.width",
                "head.num_heads", "head.timesteps", "diffusion.depth", "diffusion.width",
                "diffusion.train_steps", "diffusion.sample_steps", "diffusion.batch_mul", "tokenizer.image_size",
                "tokenizer.stride", "tokenizer.channels", "tokenizer.vocab_size", "train.global_batch_size",
                "train.micro_batch_size", "parallel.tensor", "parallel.pipeline", "sampling.batch_size",
                "checkpoint.keep_last", "logging.log_every", "head.window", "head.length_buckets",
                "parallel.collective_timeout_s"]
    for key in positive:
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj <= 0:
            err(f"{key}={obj} must be positive.")
    if errors:  # sizes below are meaningless with non-positive values
        raise ConfigError(_format(errors))

    tok, bb, head, par, tr = cfg.tokenizer, cfg.backbone, cfg.head, cfg.parallel, cfg.train
    if tok.image_size % tok.stride:
        err(f"tokenizer.image_size={tok.image_size} is not divisible by tokenizer.stride={tok.stride}; "
            f"the token grid must be whole.")
    n_tok = tok.num_tokens
    if head.supervised < 0 or head.supervised > n_tok:
        err(f"head.supervised={head.supervised} must be in [0, {n_tok}] (0 = all remaining positions).")
    if head.timesteps > n_tok:
        err(f"head.timesteps={head.timesteps} exceeds the {n_tok} positions of the grid.")
    if not 0.0 <= bb.class_dropout < 1.0:
        err(f"backbone.class_dropout={bb.class_dropout} must be in [0, 1).")
    if cfg.eval.every < 0:
        err(f"eval.every={cfg.eval.every} must be >= 0 (0 = evaluate only at the end).")
    elif cfg.eval.every and cfg.sampling.eval_per_class <= 0:
        err(f"eval.every={cfg.eval.every} needs sampling.eval_per_class > 0 (the samples per class every evaluation "
            f"draws); set e.g. sampling.eval_per_class=100, or eval.every=0.")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        err(f"train.ema_decay={cfg.train.ema_decay} must be in [0, 1) (0 disables the EMA).")

    rotary = [("backbone", bb)] + ([("head", cfg.head)] if cfg.head.type != "next" else [])
    for name, part in rotary:
        if part.pos_embed == "rope2d" and part.width % part.num_heads == 0 and (part.width // part.num_heads) % 4:
            err(f"{name}.pos_embed=rope2d needs a head dimension ({name}.width / {name}.num_heads = "
                f"{part.width // part.num_heads}) divisible by 4 (a quarter each for row and column pairs); change "
                f"the sizes or use {name}.pos_embed=learned.")
    if bb.attention == "te" and bb.transformer_impl == "local":
        err("backbone.attention=te needs TransformerEngine layers but backbone.transformer_impl=local; use "
            "transformer_impl=auto/transformer_engine (GPU with transformer_engine) or attention=sdpa.")
    for name, sec in (("backbone", bb), ("head", head)):
        if sec.width % sec.num_heads:
            err(f"{name}.width={sec.width} is not divisible by {name}.num_heads={sec.num_heads}.")
        if sec.num_heads % par.tensor:
            err(f"{name}.num_heads={sec.num_heads} is not divisible by parallel.tensor={par.tensor}; "
                f"choose a tensor-parallel size that divides the number of heads.")
        if sec.width % par.tensor:
            err(f"{name}.width={sec.width} is not divisible by parallel.tensor={par.tensor}.")
        ffn = int(sec.width * sec.mlp_ratio)
        if ffn % par.tensor:
            err(f"{name} FFN size {ffn} (width x mlp_ratio) is not divisible by parallel.tensor={par.tensor}.")
    if par.zero_stage not in (0, 1, 2, 3):
        err(f"parallel.zero_stage={par.zero_stage} must be 0, 1, 2 or 3.")
    if par.pipeline > 1 and par.zero_stage == 3:
        err(f"parallel.pipeline={par.pipeline} with parallel.zero_stage=3: ZeRO-3 gathers each layer's parameters "
            f"inside its forward with collectives that every rank must join, which deadlocks when the stages run "
            f"different layers. Use parallel.zero_stage=2 (gradients and optimizer states sharded) or 1 with "
            f"pipeline parallelism, or pipeline=1 with ZeRO-3.")
    err_split = _pipeline_split_problems(cfg)
    if err_split:
        err(err_split)
    rel = cfg.checkpoint.from_release
    if rel is not None and not (os.path.isfile(os.path.join(rel, "model.safetensors"))
                                and os.path.isfile(os.path.join(rel, "config.json"))):
        err(f"checkpoint.from_release='{rel}' is not a release folder (model.safetensors + config.json); make one "
            f"with tools/convert_ckpt.py to-release.")
    if par.ds_config is not None and not os.path.isfile(par.ds_config):
        err(f"parallel.ds_config='{par.ds_config}' does not exist; pass a file from ds_configs/.")

    ws = world_size or par.world_size or launcher_world_size()
    if ws % par.model_parallel:
        err(f"world size {ws} is not divisible by tensor x pipeline = {par.tensor} x {par.pipeline} = "
            f"{par.model_parallel}; launch a multiple of {par.model_parallel} processes.")
    else:
        dp = ws // par.model_parallel
        per_step = tr.micro_batch_size * dp
        if tr.grad_accum == 0:
            if tr.global_batch_size % per_step:
                err(f"train.global_batch_size={tr.global_batch_size} is not divisible by micro_batch_size x "
                    f"data-parallel size = {tr.micro_batch_size} x {dp} = {per_step}; cannot derive grad_accum.")
            else:
                tr.grad_accum = tr.global_batch_size // per_step
        elif tr.micro_batch_size * tr.grad_accum * dp != tr.global_batch_size:
            err(f"train.micro_batch_size x train.grad_accum x data-parallel size = {tr.micro_batch_size} x "
                f"{tr.grad_accum} x {dp} = {tr.micro_batch_size * tr.grad_accum * dp} != "
                f"train.global_batch_size={tr.global_batch_size}. Set train.grad_accum=0 to derive it, or fix "
                f"one of the sizes.")
        if par.world_size == 0:
            par.world_size = ws
    if tr.grad_accum < 0:
        err(f"train.grad_accum={tr.grad_accum} must be >= 0 (0 = derived from the global batch).")
    _validate_eval(cfg, err)
    _validate_recompute(cfg, err)
    _validate_compile(cfg, err)
    if not errors:
        _validate_memory(cfg, err)
    if errors:
        raise ConfigError(_format(errors))
    return cfg


def _validate_memory(cfg: HeptapodConfig, err) -> None:
    """A config the planner predicts not to fit the GPU (parallel.gpu_memory_gib, else the visible device) is
    refused here, before any process group or model memory exists."""
    gib = cfg.parallel.gpu_memory_gib
    if gib < 0:
        err(f"parallel.gpu_memory_gib={gib} must be >= 0 (0 = the visible GPU's memory).")
        return
    if gib == 0:
        gib = _visible_gpu_gib()
        if not gib:
            return
    from heptapod_ds.cost.plan import refusal

    problem = refusal(cfg, gib)
    if problem:
        err(f"parallel.gpu_memory_gib={gib:g}: {problem}")


def _visible_gpu_gib() -> float:
    """Memory of the first visible GPU in GiB (0 without one; torch is imported only where it already is)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None and os.path.exists("/dev/nvidiactl"):
        import torch
    if torch is None or not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(0).total_memory / 2 ** 30


def _validate_recompute(cfg: HeptapodConfig, err) -> None:
    """recompute.*: Megatron's combinations (a method or layer count only with granularity=full), known
    parts, and no more recompute layers than a part has."""
    from heptapod_ds.cost.recompute import recompute_problems

    for problem in recompute_problems(cfg):
        err(problem)


def _validate_compile(cfg: HeptapodConfig, err) -> None:
    """train.compile: the combinations measured not to work with per-layer torch.compile (torch 2.13, CPU)."""
    if not cfg.train.compile:
        return
    if cfg.parallel.zero_stage == 3:
        err("train.compile=true with parallel.zero_stage=3: ZeRO-3 gathers each submodule's parameters in a forward "
            "pre-hook that DeepSpeed marks torch.compiler.disable, so the layer cannot be compiled as one graph "
            "(measured: torch._dynamo Unsupported 'Skip calling torch.compiler.disable()d function "
            "_pre_forward_module_hook'); without fullgraph it breaks the graph at every submodule and measured ~13x "
            "slower than eager ZeRO-3. Use parallel.zero_stage=0, 1 or 2 with train.compile, or train.compile=false "
            "with ZeRO-3.")


def _validate_eval(cfg: HeptapodConfig, err) -> None:
    """In-training FID: sizes, the reference file (readable, with mu/sigma) and the extractor file."""
    ev = cfg.eval
    if ev.fid_every < 0:
        err(f"eval.fid_every={ev.fid_every} must be >= 0 (0 = no in-training FID).")
    if ev.fid_every <= 0:
        return
    if ev.fid_samples < cfg.backbone.num_classes:
        err(f"eval.fid_samples={ev.fid_samples} is fewer than the {cfg.backbone.num_classes} classes; "
            f"draw at least one image per class.")
    if ev.fid_ref:
        from heptapod_ds.evaluation.ref_stats import load_ref_stats

        try:
            load_ref_stats(os.path.expanduser(ev.fid_ref))
        except (ValueError, FileNotFoundError) as e:
            err(f"eval.fid_ref: {e}")
        else:
            _validate_adm_metrics(cfg, err)
    elif ev.fid_sfid or ev.fid_precision_recall:
        err("eval.fid_sfid / eval.fid_precision_recall need eval.fid_ref (a reference batch with mu_s/sigma_s "
            "for sFID, with images arr_0 for precision/recall).")
    elif cfg.data.path != "digits":
        err("eval.fid_every > 0 needs eval.fid_ref (reference statistics .npz with mu and sigma; build one with "
            "tools/ref_stats.py).")
    if ev.fid_inception != "bundled" and not os.path.isfile(os.path.expanduser(ev.fid_inception)):
        err(f"eval.fid_inception={ev.fid_inception!r} is neither 'bundled' nor an existing weights file.")


def _validate_adm_metrics(cfg: HeptapodConfig, err) -> None:
    """In-training sFID needs spatial statistics in eval.fid_ref; precision/recall need >= k + 1 = 4 reference
    images and samples."""
    ev = cfg.eval
    if not (ev.fid_sfid or ev.fid_precision_recall):
        return
    from heptapod_ds.evaluation.reference import load_reference

    try:
        ref = load_reference(os.path.expanduser(ev.fid_ref))
    except (ValueError, FileNotFoundError) as e:
        err(f"eval.fid_ref: {e}")
        return
    if ev.fid_sfid and ref.missing("sfid"):
        err(f"eval.fid_sfid: {ref.missing('sfid')}.")
    if ev.fid_precision_recall:
        if ref.missing("precision_recall"):
            err(f"eval.fid_precision_recall: {ref.missing('precision_recall')}.")
        if ev.fid_samples < 4:
            err(f"eval.fid_precision_recall: eval.fid_samples={ev.fid_samples}; the k=3 manifold estimate needs "
                f"at least 4 samples.")


def _pipeline_split_problems(cfg: HeptapodConfig) -> Optional[str]:
    """The stage split must be computable (``auto``) or consistent with the model (explicit counts)."""
    from heptapod_ds.pipeline.split import split_model

    try:
        split_model(cfg)
    except ValueError as e:
        return str(e)
    return None


def _format(errors: List[str]) -> str:
    if len(errors) == 1:
        return "invalid configuration: " + errors[0]
    return "invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors)
