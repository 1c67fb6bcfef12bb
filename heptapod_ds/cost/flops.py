"""Parameter counts and FLOPs of a Heptapod config, analytic (no model code).

Multiply-adds of every matmul count 2 FLOPs; attention scores and values are counted over the full
(unmasked) sequence the kernels compute; training = 3 x forward (backward costs two forwards; a
recomputed region adds one more forward of that region: :func:`recompute_flops_per_image`). Norms,
activations and softmax are left out (a few percent). The head runs T sequences per image, of N + 1
slots (global) or cut to what they read (local, :mod:`.slots`); the output (diffusion MLP x batch_mul,
or the classifier) runs on the expected number of supervised targets per image. Checked against ``torch.utils.flop_counter.FlopCounterMode`` on real
forward passes (tests/cost/test_flops.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from .slots import expected_sequences, sampling_lengths

FREQ_DIM = 256  # sinusoidal timestep features of the diffusion MLP


# --------------------------------------------------------------------------- supervision density

def _allowed(t: int, n: int, window: Optional[int]) -> int:
    remaining = n - t
    return remaining if window is None else min(window, remaining)


def expected_targets_per_image(num_tokens: int, timesteps: int, supervised: int, window: Optional[int]) -> float:
    """Mean supervised targets per image (timesteps uniform over 0..N-1; K = 0: all allowed slots)."""
    total = 0
    for t in range(num_tokens):
        a = _allowed(t, num_tokens, window)
        total += a if supervised == 0 else min(supervised, a)
    return timesteps * total / num_tokens


def targets_per_image(cfg) -> float:
    """Expected supervised targets per image of ``cfg`` (the next head: every token)."""
    head, n = cfg.head, cfg.tokenizer.num_tokens
    if head.type == "next":
        return float(n)
    window = head.window if head.type == "local" else None
    return expected_targets_per_image(n, head.timesteps, head.supervised, window)


# --------------------------------------------------------------------------- parameters

def layer_params(width: int, mlp_ratio: float) -> Tuple[int, int]:
    """(TP-sharded, replicated) parameters of one pre-norm megatron layer (biases of row-parallel linears
    and LayerNorms are replicated; column-parallel biases are sharded)."""
    ffn = int(width * mlp_ratio)
    sharded = 3 * width * width + 3 * width + width * width + width * ffn + ffn + ffn * width
    replicated = 4 * width + width + width  # two LayerNorms, proj bias, fc2 bias
    return sharded, replicated


def _denoiser_params(channels: int, cond: int, width: int, depth: int) -> int:
    return ((channels * width + width) + (FREQ_DIM * width + width + width * width + width)
            + (cond * width + width) + depth * (2 * (width * width + width) + width * 3 * width + 3 * width)
            + (width * 2 * width + 2 * width) + (width * channels + channels))


def param_counts(cfg, tensor_parallel: int = 1) -> Dict[str, Dict[str, int]]:
    """{part: {"sharded": n, "replicated": n, "total": n}} of the *full* model (TP-sharded tensors counted
    whole) for backbone, head and diffusion (the per-token output); ``per_tp_rank`` = what one TP rank holds."""
    tok, bb, head, diff = cfg.tokenizer, cfg.backbone, cfg.head, cfg.diffusion
    grid = tok.grid_size
    s, r = layer_params(bb.width, bb.mlp_ratio)
    bb_rep = (bb.num_classes + 1) * bb.width + 2 * bb.width
    bb_rep += tok.vocab_size * bb.width if tok.is_discrete else tok.channels * bb.width + bb.width
    if bb.pos_embed != "rope2d":
        bb_rep += 2 * (grid + 1) * bb.width
    parts = {"backbone": (bb.depth * s, bb.depth * r + bb_rep)}
    if head.type == "next":
        parts["head"] = (0, 0)
        cond = bb.width
    else:
        hs, hr = layer_params(head.width, head.mlp_ratio)
        h_rep = bb.width * head.width + head.width + head.width + 2 * head.width
        if head.pos_embed != "rope2d":
            h_rep += 2 * (grid + 1) * head.width
        parts["head"] = (head.depth * hs, head.depth * hr + h_rep)
        cond = head.width
    if tok.is_discrete:
        parts["diffusion"] = (0, cond * tok.vocab_size + tok.vocab_size)
    else:
        parts["diffusion"] = (0, _denoiser_params(tok.channels, cond, diff.width, diff.depth))
    out = {}
    for name, (sh, rep) in parts.items():
        out[name] = {"sharded": sh, "replicated": rep, "total": sh + rep,
                     "per_tp_rank": sh // tensor_parallel + rep}
    return out


def param_totals(cfg) -> Dict[str, int]:
    """{"backbone", "head", "diffusion", "total"} parameters of the full model."""
    counts = {k: v["total"] for k, v in param_counts(cfg).items()}
    counts["total"] = sum(counts.values())
    return counts


# --------------------------------------------------------------------------- FLOPs

def _layer_flops(tokens: int, seq: int, width: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one pre-norm Transformer layer over ``tokens`` tokens in sequences of ``seq``."""
    ffn = int(width * mlp_ratio)
    dense = 2 * (4 * width * width + 2 * width * ffn)
    attention = 2 * 2 * seq * width
    return tokens * (dense + attention)


def _denoiser_flops(channels: int, cond: int, width: int, depth: int, freq_dim: int = FREQ_DIM) -> float:
    per_token = (channels * width + freq_dim * width + width * width + cond * width
                 + depth * (2 * width * width + 3 * width * width) + 2 * width * width + width * channels)
    return 2 * per_token


def output_flops_per_target(cfg) -> float:
    """Forward FLOPs of the per-token output for one supervised target (diffusion: all batch_mul copies)."""
    tok, diff = cfg.tokenizer, cfg.diffusion
    cond = cfg.backbone.width if cfg.head.type == "next" else cfg.head.width
    if tok.is_discrete:
        return 2.0 * cond * tok.vocab_size
    return float(diff.batch_mul * _denoiser_flops(tok.channels, cond, diff.width, diff.depth))


def head_layer_flops(cfg, sequences: Sequence[Tuple[int, float]]) -> float:
    """Forward FLOPs per image of one head layer over the computed sequences [(length, per image)]."""
    head = cfg.head
    return float(sum(_layer_flops(count * length, length, head.width, head.mlp_ratio) for length, count in sequences))


def chain_flops(cfg, targets: Optional[float] = None,
                head_sequences: Optional[Sequence[Tuple[int, float]]] = None) -> List[Tuple[str, float]]:
    """Forward FLOPs per image of every link of the model's chain, in order.

    Links: ``embed`` (class/token embeddings; the latent projection for continuous tokens),
    ``backbone.i`` (one causal layer each), ``head_input`` (projection, mask token, 2D positions, one
    copy per drawn timestep), ``head.j`` (one head layer each), ``output`` (per-token output + loss).
    The pipeline split (:mod:`heptapod_ds.pipeline.split`) balances stages with these numbers, and
    :func:`forward_flops_per_image` sums them, so both use one accounting. ``targets``: supervised
    targets of the image (default: the expectation). ``head_sequences``: the head's computed sequences
    per image as [(slots, count)] (default: the expectation, :func:`.slots.expected_sequences`: the global
    head T of N + 1 slots, the local head T cut to its length buckets).
    """
    tok, bb, head = cfg.tokenizer, cfg.backbone, cfg.head
    n = tok.num_tokens
    links: List[Tuple[str, float]] = [("embed", 0.0 if tok.is_discrete else 2.0 * tok.channels * bb.width * n)]
    links += [(f"backbone.{i}", float(_layer_flops(n, n, bb.width, bb.mlp_ratio))) for i in range(bb.depth)]
    if head.type != "next":
        sequences = expected_sequences(cfg) if head_sequences is None else head_sequences
        links.append(("head_input", float(2 * bb.width * head.width * n)))
        links += [(f"head.{j}", head_layer_flops(cfg, sequences)) for j in range(head.depth)]
    count = targets_per_image(cfg) if targets is None else targets
    links.append(("output", float(output_flops_per_target(cfg) * count)))
    return links


def forward_flops_per_image(cfg) -> Dict[str, float]:
    """{"backbone", "head", "diffusion"}: sums of :func:`chain_flops` (embed counts to the backbone)."""
    out = {"backbone": 0.0, "head": 0.0, "diffusion": 0.0}
    for name, flops in chain_flops(cfg):
        if name == "output":
            out["diffusion"] += flops
        elif name == "head_input" or name.startswith("head."):
            out["head"] += flops
        else:
            out["backbone"] += flops
    return out


def train_flops_per_image(cfg) -> int:
    """Training FLOPs (forward + backward) per image: backbone + head + diffusion MLP / classifier."""
    return int(round(3 * sum(forward_flops_per_image(cfg).values())))


def recompute_flops_per_image(cfg) -> float:
    """Extra forward FLOPs per image that the recompute setting re-runs in backward (attention scores and
    values for selective; the recomputed layers / output for full)."""
    from .recompute import plan

    what = plan(cfg)
    tok, bb, head = cfg.tokenizer, cfg.backbone, cfg.head
    n = tok.num_tokens
    extra = 0.0
    seqs = {"backbone": ([(n, 1.0)], bb), "head": (expected_sequences(cfg), head)}
    for part in what["selective"]:
        sequences, sec = seqs[part]
        extra += sec.depth * sum(count * length * 4.0 * length * sec.width for length, count in sequences)
    for part, chunks in what["chunks"].items():
        sequences, sec = seqs[part]
        layers = sum(e - s for s, e in chunks)
        extra += layers * sum(_layer_flops(count * length, length, sec.width, sec.mlp_ratio)
                              for length, count in sequences)
    if what["output"]:
        extra += output_flops_per_target(cfg) * targets_per_image(cfg)
    return extra


def sample_flops_per_image(cfg, num_steps: Optional[int] = None) -> float:
    """Forward FLOPs to sample one image with the KV cache: N backbone steps (one slot each, attending to
    the cached prefix), N head passes (one timestep each, over the slots it reads: all N + 1, the local
    head its prefix and window), and per token the output
    (diffusion: ``num_steps`` DDPM steps of the MLP, x2 rows with classifier-free guidance is not counted
    here; discrete: one classifier row)."""
    tok, bb, head, diff = cfg.tokenizer, cfg.backbone, cfg.head, cfg.diffusion
    n = tok.num_tokens
    ffn = int(bb.width * bb.mlp_ratio)
    dense = 2 * (4 * bb.width * bb.width + 2 * bb.width * ffn)
    backbone = bb.depth * sum(dense + 4 * (t + 1) * bb.width for t in range(n))
    embed = 0.0 if tok.is_discrete else 2.0 * tok.channels * bb.width * n
    if head.type == "next":
        head_f, cond = 0.0, bb.width
    else:
        head_f = sum(head.depth * _layer_flops(length, length, head.width, head.mlp_ratio) for length in
                     sampling_lengths(cfg)) + n * 2 * bb.width * head.width * n
        cond = head.width
    if tok.is_discrete:
        out = n * 2.0 * cond * tok.vocab_size
    else:
        steps = diff.sample_steps if num_steps is None else num_steps
        out = n * steps * _denoiser_flops(tok.channels, cond, diff.width, diff.depth)
    return float(backbone + embed + head_f + out)
