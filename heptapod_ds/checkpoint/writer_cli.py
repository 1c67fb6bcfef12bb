"""``reshard`` and ``from-release``: training checkpoints for another layout (see :mod:`.writer`)."""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time
from typing import Any, Dict

log = logging.getLogger("convert_ckpt")


def _layout_args(p) -> None:
    p.add_argument("--out", required=True, help="run directory to write (checkpoints/global_stepN, latest, "
                                                "config.yaml); resume it with run_dir=RUN_DIR")
    p.add_argument("--tensor", type=int, required=True, help="tensor-parallel size of the new layout")
    p.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel size of the new layout (stages "
                                                           "split as parallel.pipeline_split=auto decides)")
    p.add_argument("--dp", type=int, required=True, help="data-parallel size of the new layout")
    p.add_argument("--zero", type=int, required=True, choices=(0, 1, 2, 3), help="ZeRO stage of the new "
                                                                                 "layout")
    p.add_argument("--layer-impl", choices=("local", "transformer_engine"), default=None,
                   help="layer implementation whose parameter names the checkpoint uses (TransformerEngine "
                        "fuses the LayerNorms into the next linear); default: the config's "
                        "backbone.transformer_impl, auto meaning TransformerEngine when it imports here. "
                        "Sets backbone.transformer_impl of the written config.")
    p.add_argument("--force", action="store_true", help="replace an existing --out run of the same model")


def add_parsers(sub) -> None:
    p = sub.add_parser("reshard", help="training checkpoint -> training checkpoint of another layout",
                       description="Re-partition a training checkpoint for --tensor/--pipeline/--dp/--zero, "
                                   "carrying fp32 master weights, AdamW moments and step, LR schedule, EMA, "
                                   "RNG states and the data position. Resume with run_dir=OUT.")
    p.add_argument("--ckpt", required=True, help="run directory, checkpoints/ folder or global_stepN folder")
    _layout_args(p)
    p.set_defaults(func=cmd_reshard)
    p = sub.add_parser("from-release", help="release -> step-0 training checkpoint (fresh optimizer) to "
                                            "fine-tune",
                       description="Build a training checkpoint of the given layout whose weights (and EMA) "
                                   "are "
                                   "the release's and whose optimizer state, LR schedule and data position "
                                   "start fresh.")
    p.add_argument("--release", required=True, help="release folder (model.safetensors + config.json)")
    _layout_args(p)
    p.set_defaults(func=cmd_from_release)


def check_out_run(out: pathlib.Path, cfg, force: bool) -> None:
    """Refuse an existing --out: always when it holds a run of another model, else without --force."""
    from heptapod_ds.config.loader import to_dict
    from heptapod_ds.engine.checkpoint import IDENTITY_FIELDS, _get

    from .output import OutputExistsError

    if not out.exists():
        return
    saved = None
    cfg_file = out / "config.yaml"
    if cfg_file.is_file():
        import yaml
        saved = yaml.safe_load(cfg_file.read_text())
    if isinstance(saved, dict):
        mine = to_dict(cfg)
        diffs = [f"{k}: existing run {_get(saved, k)!r}, this checkpoint {_get(mine, k)!r}"
                 for k in IDENTITY_FIELDS if _get(saved, k) != _get(mine, k)]
        if diffs:
            raise ValueError(f"--out {out} holds a run of another model ({cfg_file}):\n  - "
                             + "\n  - ".join(diffs)
                             + "\nChoose a new --out; --force does not mix two models in one run directory.")
    if not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it, or choose "
                                f"another --out.")


def _normalise_position(data: Dict[str, Any], cfg) -> Dict[str, Any]:
    if "global_batches" in data:
        return dict(data)
    accum = max(1, cfg.train.grad_accum)
    return {"epoch": int(data["epoch"]), "global_batches": int(data["micro_step"]) // accum,
            "global_batch_size": cfg.train.global_batch_size}


def _write_run(out: pathlib.Path, force: bool, state, tcfg, bar_desc: str, spill=None) -> pathlib.Path:
    from heptapod_ds.config.loader import to_yaml

    from .progress import _bar
    from .output import staged_dir
    from .writer import LayoutWriter

    with staged_dir(out, force) as tmp:
        if spill is not None:
            spill(tmp)
        writer = LayoutWriter(state, tcfg, tmp / "checkpoints")
        with _bar(writer.file_count(), bar_desc) as bar:
            writer.progress = bar.update
            tag = writer.write()
        (tmp / "config.yaml").write_text(to_yaml(tcfg))
        shutil.rmtree(tmp / ".canonical", ignore_errors=True)
        name = tag.name
    return out / "checkpoints" / name


def cmd_reshard(args) -> int:
    import torch

    from heptapod_ds.engine import safe_load

    from .progress import _bar, _peak_rss_mib
    from .output import check_free
    from .reader import KINDS, TrainingCheckpoint
    from .world import ensure_local_world
    from .writer import TrainingState, target_config

    out = pathlib.Path(args.out)
    t0 = time.perf_counter()
    ensure_local_world()
    src = TrainingCheckpoint(args.ckpt)
    tcfg = target_config(src.cfg, args.tensor, args.pipeline, args.dp, args.zero, args.layer_impl)
    check_out_run(out, src.cfg, args.force)
    check_free(out, args.force)
    log.info("reshard: %s (step %d, layout %s) -> %s with tensor=%d pipeline=%d dp=%d zero=%d", src.dir,
             src.step,
             src.layout(), out, args.tensor, args.pipeline, args.dp, args.zero)
    kinds = [k for k in KINDS if k != "ema" or src.has_ema]
    rank0 = src.rank_state(0)
    ms = src.model_states()
    spilled: Dict[str, pathlib.Path] = {}

    def spill(tmp: pathlib.Path) -> None:
        """Canonical tensors, one kind at a time, to files read back memory-mapped by the writer."""
        canon = tmp / ".canonical"
        canon.mkdir()
        with _bar(len(kinds) * src.tp, "read") as bar:
            for kind in kinds:
                tensors = src.tensors(kind, progress=bar.update)
                spilled[kind] = canon / f"{kind}.pt"
                torch.save(tensors, spilled[kind])
                del tensors

    def tensors_of(kind: str):
        return safe_load.load(spilled[kind], mmap=True) if kind in spilled else None

    from . import zero_layout as zl

    rng = {k: v for k, v in rank0["rng"].items() if k != "megatron"}
    stage_rng = []
    for p in range(src.pp):  # the default generators differ per stage (seed + 100 x stage)
        ranks = [src.rank_state(zl.global_rank(r, 0, p, src.tp, src.dp))["rng"] for r in range(src.tp)]
        stage_rng.append(({k: v for k, v in ranks[0].items() if k != "megatron"},
                          [st.get("megatron") for st in ranks]))
    client = dict(rank0["client_state"])
    client["data"] = _normalise_position(client.get("data", {"epoch": 0, "global_batches": 0}), src.cfg)
    state = TrainingState(cfg=src.cfg, specs=src.specs, step=src.step, optimizer_step=src.optimizer_step(),
                          tensors=tensors_of, scheduler=ms["lr_scheduler"],
                          counters={k: int(ms[k])
                                    for k in ("global_steps", "global_samples", "skipped_steps")},
                          ema=src.ema_counters() or None, rng=rng,
                          megatron_rng=stage_rng[0][1], stage_rng=stage_rng, client_state=client,
                          source={"path": str(src.dir.resolve()), "step": src.step, "layout": src.layout()})
    tag = _write_run(out, args.force, state, tcfg, "write", spill=spill)
    log.info("wrote %s in %.1fs, peak RSS %s; resume with run_dir=%s", tag, time.perf_counter() - t0,
             _peak_rss_mib(), out)
    return 0


def _fresh_rng(seed: int) -> Dict[str, Any]:
    """python / numpy / torch states as ``parallel_state.seed_everything(seed)`` leaves them on stage 0 (stage
    k: ``seed + 100 k``)."""
    import random

    import numpy as np
    import torch

    from heptapod_ds.engine.checkpoint import rng_state

    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    state = {k: v for k, v in rng_state().items() if k != "megatron"}
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    return state


def cmd_from_release(args) -> int:
    from .progress import _peak_rss_mib
    from .names import model_spec
    from .output import check_free
    from .release import RELEASE_FILE, load_release, verify_release
    from .world import ensure_local_world
    from .writer import TrainingState, target_config

    out = pathlib.Path(args.out)
    t0 = time.perf_counter()
    problems = verify_release(args.release) if (pathlib.Path(args.release) / RELEASE_FILE).is_file() else []
    if problems:
        raise ValueError("release is damaged:\n  - " + "\n  - ".join(problems))
    cfg, weights = load_release(args.release, stream=True)  # read tensor by tensor (StreamedWeights)
    tcfg = target_config(cfg, args.tensor, args.pipeline, args.dp, args.zero, args.layer_impl)
    check_out_run(out, cfg, args.force)
    check_free(out, args.force)
    ensure_local_world()
    specs = model_spec(cfg)
    missing = [s.name for s in specs if s.name not in weights]
    wrong = [f"{s.name} {weights.shape(s.name)} (config: {s.shape})" for s in specs
             if s.name in weights and weights.shape(s.name) != s.shape]
    if missing or len(weights) != len(specs) or wrong:
        raise ValueError(f"{args.release}/model.safetensors does not fit its config.json: missing "
                         f"{missing[:3]}, {len(weights) - len(specs) + len(missing)} unexpected, shapes "
                         f"{wrong[:3]}.")
    ema = {"decay": cfg.train.ema_decay, "num_updates": 0} if cfg.train.ema_decay > 0 else None
    state = TrainingState(cfg=cfg, specs=specs, step=0, optimizer_step=0,
                          tensors=lambda kind: weights if kind in ("fp32", "ema") else None, scheduler=None,
                          counters={"global_steps": 0, "global_samples": 0, "skipped_steps": 0}, ema=ema,
                          rng=_fresh_rng(cfg.train.seed), megatron_rng=[],
                          stage_rng=[(_fresh_rng(cfg.train.seed + 100 * p), [])
                                     for p in range(tcfg.parallel.pipeline)],
                          client_state={"step": 0, "data": {"epoch": 0, "global_batches": 0,
                                                            "global_batch_size": cfg.train.global_batch_size},
                                        "nonfinite": {"in_a_row": 0, "total_skipped": 0}},
                          source={"release": str(pathlib.Path(args.release).resolve())})
    tag = _write_run(out, args.force, state, tcfg, "write")
    log.info("wrote %s in %.1fs, peak RSS %s (fresh optimizer); train with run_dir=%s", tag,
             time.perf_counter() - t0, _peak_rss_mib(), out)
    print(json.dumps({"checkpoint": str(tag)}))
    return 0
