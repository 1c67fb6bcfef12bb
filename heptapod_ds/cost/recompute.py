"""The recompute setting as data: which parts, which layers, in which chunks (no model code).

Shared by config validation, the model (:mod:`heptapod_ds.model.recompute`) and the memory model
(:mod:`heptapod_ds.cost.memory`), so the three agree on what is recomputed.

Megatron's vocabulary (``--recompute-granularity/-method/-num-layers``):

* ``selective``: the core attention of every layer of the chosen stacks (scores, softmax, dropout of
  the probabilities) is recomputed in backward; nothing else changes. It has no method or layer count.
* ``full`` + ``uniform``: every layer of a stack, in chunks of ``num_layers`` consecutive layers; only
  each chunk's input is kept.
* ``full`` + ``block``: only the first ``num_layers`` layers of a stack, one by one.

``parts``: ``backbone`` and ``head`` are the layer stacks; ``output`` is the per-token output (diffusion
MLP x batch_mul copies, or the classifier) over the supervised targets: ``full`` recomputes it whole,
``selective`` leaves it alone (it has no attention).

Deviation from Megatron, stated: with pipeline parallelism ``block`` counts the first layers of each
part of the whole model (Megatron counts per stage), and ``uniform`` chunks of more than one layer are
refused at pipeline > 1 (a chunk could straddle two stages).
"""
from __future__ import annotations

from typing import List, Tuple

PARTS = ("backbone", "head", "output")


def parse_parts(text) -> Tuple[str, ...]:
    """``"backbone,head"`` -> ("backbone", "head") (a list is accepted too); order and duplicates dropped."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    names = [str(p).strip() for p in items if str(p).strip()]
    return tuple(p for p in PARTS if p in names) + tuple(p for p in names if p not in PARTS)


def part_depths(cfg) -> dict:
    """Layers of each stack of the model (the head has none with head.type=next)."""
    return {"backbone": cfg.backbone.depth, "head": cfg.head.depth if cfg.head.type != "next" else 0}


def recompute_problems(cfg) -> List[str]:
    """Problems of ``cfg.recompute`` (empty when it is usable); each names the fix."""
    rc = cfg.recompute
    problems = []
    names = parse_parts(rc.parts)
    unknown = [p for p in names if p not in PARTS]
    if unknown:
        problems.append(f"recompute.parts={rc.parts!r}: unknown part(s) {', '.join(unknown)}; choose among "
                        f"{', '.join(PARTS)} (comma-separated), e.g. recompute.parts=backbone,head.")
    if not names:
        problems.append("recompute.parts is empty; name at least one of backbone, head, output, or set "
                        "recompute.granularity=none.")
    if rc.granularity not in ("none", "selective", "full"):
        return problems  # reported with the choices
    if rc.granularity != "full":
        if rc.method != "uniform":
            problems.append(f"recompute.method={rc.method} applies to recompute.granularity=full only "
                            f"(granularity={rc.granularity}); drop recompute.method or set granularity=full.")
        if rc.num_layers != 1:
            problems.append(f"recompute.num_layers={rc.num_layers} applies to recompute.granularity=full only "
                            f"(granularity={rc.granularity}); drop recompute.num_layers or set granularity=full.")
        return problems
    if rc.num_layers < 1:
        problems.append(f"recompute.num_layers={rc.num_layers} must be >= 1.")
        return problems
    depths = part_depths(cfg)
    for part in ("backbone", "head"):
        if part in names and depths[part] and rc.num_layers > depths[part]:
            problems.append(f"recompute.num_layers={rc.num_layers} exceeds the {depths[part]} layers of the {part}; "
                            f"use recompute.num_layers<={depths[part]} or leave the {part} out of recompute.parts.")
    if rc.method == "uniform" and rc.num_layers > 1 and cfg.parallel.pipeline > 1:
        problems.append(f"recompute.method=uniform with recompute.num_layers={rc.num_layers} and parallel.pipeline="
                        f"{cfg.parallel.pipeline}: a chunk of layers could straddle two stages; use "
                        f"recompute.num_layers=1 (every layer) or recompute.method=block with pipelines.")
    return problems


def layer_chunks(depth: int, granularity: str, method: str, num_layers: int) -> List[Tuple[int, int]]:
    """[(first, end)] of the layers of a ``depth``-layer stack checkpointed together (granularity=full)."""
    if granularity != "full" or depth <= 0:
        return []
    if method == "block":
        return [(i, i + 1) for i in range(min(num_layers, depth))]
    k = max(1, num_layers)
    return [(i, min(i + k, depth)) for i in range(0, depth, k)]


def plan(cfg):
    """{part: chunks} for the stacks and ``{"output": bool}``, ``{"selective": (parts...)}``: what is recomputed."""
    rc = cfg.recompute
    names = parse_parts(rc.parts)
    depths = part_depths(cfg)
    out = {"granularity": rc.granularity, "selective": (), "chunks": {}, "output": False}
    if rc.granularity == "selective":
        out["selective"] = tuple(p for p in ("backbone", "head") if p in names and depths[p])
    elif rc.granularity == "full":
        out["chunks"] = {p: layer_chunks(depths[p], "full", rc.method, rc.num_layers)
                         for p in ("backbone", "head") if p in names and depths[p]}
        out["output"] = "output" in names
    return out
