"""Where the model's chain is cut into pipeline stages: the one place that decides it.

The chain (:func:`heptapod_ds.cost.flops.chain_flops`) is ``embed, backbone.0 .. backbone.{D-1},
head_input, head.0 .. head.{H-1}, output``. Stages take contiguous pieces. Three links are attached to
a neighbour rather than counted on their own: ``embed`` goes with the first backbone layer (stage 0),
``head_input`` with the first head layer (so the activation crosses a stage boundary in its smaller
``[N, mb, backbone.width]`` form, not the ``T``-times larger head form), and ``output`` (per-token
output + loss) is always on the last stage. A stage is described by how many *layers* (backbone +
head) it holds; the last stage may hold none and run the output alone.

``parallel.pipeline_split=auto`` minimises the largest stage's share of the training FLOPs (same
accounting as ``cost/flops.py``); an explicit ``6,6,4,4`` gives the layer counts per stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from heptapod_ds.cost.flops import chain_flops


@dataclass(frozen=True)
class Stage:
    index: int
    links: Tuple[str, ...]       # chain links of this stage, in order
    flops: float                 # forward FLOPs per image of these links

    @property
    def layers(self) -> int:
        return sum(1 for n in self.links if n.startswith(("backbone.", "head.")))

    def has(self, link: str) -> bool:
        return link in self.links

    def layer_indices(self, block: str) -> List[int]:
        """Indices of this stage's layers of ``block`` ("backbone" or "head")."""
        return [int(n.split(".")[1]) for n in self.links if n.startswith(block + ".")]


@dataclass(frozen=True)
class PipelineSplit:
    stages: Tuple[Stage, ...]
    backbone_depth: int
    head_depth: int
    mode: str                    # "auto" or "explicit"

    @property
    def counts(self) -> List[int]:
        return [s.layers for s in self.stages]

    @property
    def shares(self) -> List[float]:
        total = sum(s.flops for s in self.stages)
        return [s.flops / total for s in self.stages]

    def owns_last_backbone_layer(self, stage: int) -> bool:
        return self.stages[stage].has(f"backbone.{self.backbone_depth - 1}")

    def owns_last_head_layer(self, stage: int) -> bool:
        return self.head_depth > 0 and self.stages[stage].has(f"head.{self.head_depth - 1}")


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle fraction of the 1F1B schedule with equal stages: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def parse_split(text: str) -> Optional[List[int]]:
    """``auto`` -> None; ``6,6,4,4`` or ``[6, 6, 4, 4]`` -> [6, 6, 4, 4]. Raises ValueError otherwise."""
    text = str(text).strip()
    if text == "auto":
        return None
    body = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        counts = [int(x) for x in body.split(",") if x.strip() != ""]
    except ValueError:
        raise ValueError(f"parallel.pipeline_split='{text}' is neither 'auto' nor a comma-separated list of "
                         f"layer counts per stage (e.g. 6,6,4,4).") from None
    if not counts:
        raise ValueError(f"parallel.pipeline_split='{text}' lists no stages; write e.g. 6,6,4,4 or auto.")
    return counts


def check_counts(counts: Sequence[int], stages: int, backbone_depth: int, head_depth: int) -> List[str]:
    """Problems of an explicit split (empty when it is usable)."""
    total = backbone_depth + head_depth
    problems = []
    if len(counts) != stages:
        problems.append(f"parallel.pipeline_split lists {len(counts)} stages but parallel.pipeline={stages}.")
    if sum(counts) != total:
        problems.append(f"parallel.pipeline_split={','.join(map(str, counts))} sums to {sum(counts)} layers; the "
                        f"model has {total} (backbone.depth={backbone_depth} + head layers={head_depth}).")
    if any(c < 1 for c in counts[:-1]) or (counts and counts[-1] < 0):
        problems.append(f"parallel.pipeline_split={','.join(map(str, counts))}: every stage but the last needs "
                        f"at least one layer (the last may hold 0 and run only the per-token output).")
    return problems


def _atoms(links: Sequence[Tuple[str, float]]) -> List[Tuple[Tuple[str, ...], float]]:
    """Layers with their attached links; the output is the last atom."""
    atoms: List[Tuple[List[str], float]] = []
    pending: List[str] = []
    pending_flops = 0.0
    for name, flops in links:
        if name in ("embed", "head_input"):
            pending.append(name)
            pending_flops += flops
        elif name == "output":
            atoms.append(([*pending, name], pending_flops + flops))
            pending, pending_flops = [], 0.0
        else:
            atoms.append(([*pending, name], pending_flops + flops))
            pending, pending_flops = [], 0.0
    return [(tuple(names), f) for names, f in atoms]


def _group(atoms, counts: Sequence[int]) -> List[Tuple[Tuple[str, ...], float]]:
    """Stages from layer counts: the output atom joins the last stage."""
    groups, i = [], 0
    layers, output = atoms[:-1], atoms[-1]
    for c in counts:
        names = tuple(n for a in layers[i:i + c] for n in a[0])
        groups.append((names, sum(a[1] for a in layers[i:i + c])))
        i += c
    names, flops = groups[-1]
    groups[-1] = (names + output[0], flops + output[1])
    return groups


def _balanced_counts(atoms, stages: int) -> List[int]:
    """Layer counts minimising the largest stage (linear partition by dynamic programming)."""
    layers, output = [a[1] for a in atoms[:-1]], atoms[-1][1]
    n = len(layers)
    prefix = [0.0]
    for f in layers:
        prefix.append(prefix[-1] + f)
    inf = float("inf")
    # best[k][i]: smallest possible max over the first k stages holding layers[:i] (each >= 1 layer)
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for i in range(1, n + 1):
        best[0][i] = prefix[i]
    for k in range(1, stages - 1):
        for i in range(k + 1, n + 1):
            for j in range(k, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    # the last stage holds layers[j:] (possibly none) plus the output
    if stages == 1:
        return [n]
    last_best, last_j = inf, n
    for j in range(stages - 1, n + 1):
        cost = max(best[stages - 2][j], prefix[n] - prefix[j] + output)
        if cost < last_best:
            last_best, last_j = cost, j
    counts = [n - last_j]
    i = last_j
    for k in range(stages - 2, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    counts.append(i)
    return counts[::-1]


def split_model(cfg, stages: Optional[int] = None, split: Optional[str] = None) -> PipelineSplit:
    """The stage split of ``cfg`` (``parallel.pipeline`` stages, ``parallel.pipeline_split``)."""
    stages = int(stages if stages is not None else cfg.parallel.pipeline)
    text = split if split is not None else cfg.parallel.pipeline_split
    links = chain_flops(cfg)
    head_depth = cfg.head.depth if cfg.head.type != "next" else 0
    atoms = _atoms(links)
    n_layers = len(atoms) - 1
    if stages < 1:
        raise ValueError(f"parallel.pipeline={stages} must be positive.")
    if stages > n_layers + 1:
        raise ValueError(f"parallel.pipeline={stages} stages for {n_layers} layers: at most {n_layers + 1} "
                         f"stages (one layer each, plus one for the output).")
    counts = parse_split(text)
    mode = "auto" if counts is None else "explicit"
    if counts is None:
        counts = _balanced_counts(atoms, stages)
    else:
        problems = check_counts(counts, stages, cfg.backbone.depth, head_depth)
        if problems:
            raise ValueError(" ".join(problems))
    groups = _group(atoms, counts)
    return PipelineSplit(stages=tuple(Stage(k, names, flops) for k, (names, flops) in enumerate(groups)),
                         backbone_depth=cfg.backbone.depth, head_depth=head_depth, mode=mode)


def _ranges(names: Sequence[str]) -> str:
    """``embed, backbone 0-7, head_input, head 0-3, output``."""
    parts: List[str] = []
    block, first, last = None, None, None

    def flush():
        if block is not None:
            parts.append(f"{block} {first}" if first == last else f"{block} {first}-{last}")
    for n in names:
        if n.startswith(("backbone.", "head.")):
            b, i = n.split(".")
            i = int(i)
            if b == block and i == last + 1:
                last = i
                continue
            flush()
            block, first, last = b, i, i
        else:
            flush()
            block = None
            parts.append(n)
    flush()
    return ", ".join(parts)


def activation_shape(cfg, split: PipelineSplit, stage: int, micro_batch: int) -> Optional[Tuple[int, int, int]]:
    """Shape of the activation stage ``stage`` sends on (None for the last stage)."""
    if stage == len(split.stages) - 1:
        return None
    n, T = cfg.tokenizer.num_tokens, cfg.head.timesteps
    if any(l.startswith("head") for l in split.stages[stage].links):
        return (n + 1, micro_batch * T, cfg.head.width)
    return (n, micro_batch, cfg.backbone.width)


def describe(cfg, split: PipelineSplit, micro_batches: Optional[int] = None,
             micro_batch: Optional[int] = None) -> str:
    """Human-readable split: links, FLOP share and the activation each stage sends; the 1F1B bubble."""
    p = len(split.stages)
    lines = [f"pipeline split over {p} stages ({split.mode}): layers per stage "
             f"{','.join(map(str, split.counts))}"]
    mb = micro_batch or cfg.train.micro_batch_size
    for s, share in zip(split.stages, split.shares):
        shape = activation_shape(cfg, split, s.index, mb)
        sends = f"sends {list(shape)}" if shape else "computes the loss"
        lines.append(f"  stage {s.index}: {share * 100:5.1f}% of FLOPs  {_ranges(s.links):<44} {sends}")
    if micro_batches is not None and p > 1:
        imbalance = max(split.shares) * p
        lines.append(f"  1F1B bubble with {micro_batches} micro-batches: (p-1)/(m+p-1) = "
                     f"{bubble_fraction(p, micro_batches) * 100:.1f}%; largest stage = {imbalance:.2f} x the "
                     f"mean stage")
    return "\n".join(lines)
