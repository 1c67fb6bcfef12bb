"""Bytes per rank of a Heptapod config: model states, activations saved for backward, buffers (analytic).

Activations are what autograd keeps between a micro-batch's forward and its backward, per part, counted
tensor by tensor from what the layers save (checked exactly against ``saved_tensors_hooks`` through
the real model in tests/cost/test_memory.py). Per pre-norm megatron layer over t = s x b tokens
(e = activation bytes, TP divides the sharded tensors; no sequence parallelism):

* always: layer input, LN1 output, LN2 input and output (4 t W e, replicated), QKV (3 t W e / tp),
  FC1 output and GELU output (2 t ffn e / tp), LayerNorm mean/rstd (4 x t x 4 bytes);
* core attention, flash kernel (SDPA without attention dropout; on a GPU also with it): the output
  (t W e / tp, also the projection's input) and the log-sum-exp (t heads x 4 / tp); math kernel
  (``backbone.attention=megatron``, or SDPA with attention dropout on CPU): q and k copies
  (2 t W e / tp), the probabilities (b heads s^2 e / tp), with dropout its mask and the dropped
  probabilities, the context (t W e / tp), and megatron's causal mask (s^2 bytes);
* rotary positions: the rotated q and k (2 t W e / tp, flash only; the math kernel's copies are those)
  and the angles' cos/sin (4 s d_head e);
* hidden dropout (p > 0): two masks of t W x mask bytes (CPU: the input dtype; CUDA: 1 byte).

Recompute (:mod:`.recompute`): a ``full`` chunk keeps only its input (t W e), ``selective`` keeps the
core attention's inputs and output only. What is left out: the temporary peak inside one layer's
backward (the largest layer's activations again, recomputed or not), allocator fragmentation (the
planner's margin), and the optimizer's step-time temporaries.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from .flops import param_counts, targets_per_image
from .slots import expected_sequences
from .recompute import plan as recompute_plan



def _dtype_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def _attention_kernel(cfg, device: str) -> str:
    """"flash" or "math" for the core attention as it runs on ``device``."""
    att = cfg.backbone.attention
    if att == "megatron":
        return "math"
    if att in ("te",):
        return "flash"
    if cfg.backbone.dropout > 0 and device == "cpu":
        # CPU SDPA with dropout_p > 0 takes the math path, in fp32 for bf16 inputs
        return "math_fp32" if _precision(cfg, device) == "bf16" else "sdpa_math"
    return "flash"


def layer_activation_bytes(*, tokens: int, seq: int, batch: int, width: int, ffn: int, heads: int, tp: int,
                           e: int, kernel: str, rope: bool, causal: bool, dropout: bool, mask_bytes: int,
                           selective: bool = False, masked: bool = False) -> int:
    """Bytes one layer saves for backward (see the module docstring)."""
    t = tokens
    out = 4 * t * width * e + 4 * e * t + (3 * t * width + 2 * t * ffn) * e // tp  # LN mean/rstd: input dtype
    if kernel == "math_fp32" and not selective:  # fp32 copies of q, k, v replace QKV and the rotated q, k
        out -= 3 * t * width * e // tp
        scores = batch * (heads // tp) * seq * seq
        core = t * width * e // tp + 3 * t * width * 4 // tp + scores * 4 * (3 if dropout else 1)
        if rope:
            core += 4 * seq * (width // heads) * e
        if dropout:
            core += 2 * t * width * mask_bytes
        return int(out + core)
    d_head = width // heads
    scores = batch * (heads // tp) * seq * seq
    core = t * width * e // tp  # the attention output / context (the output projection's input)
    if not selective and kernel == "flash":
        core += t * (heads // tp) * 4 + (batch * seq * seq * e if masked else 0)  # lse; the additive mask
    elif not selective:  # math: megatron's unfused attention, or CPU SDPA's fallback (scaled q, k copies)
        core += scores * e + (seq * seq if causal and kernel == "math" else 0)
        if kernel == "sdpa_math" and not rope:
            core += 2 * t * width * e // tp
        if dropout:
            core += scores * (mask_bytes + e)
    if rope:
        core += 2 * t * width * e // tp + 4 * seq * d_head * e  # rotated q and k, cos/sin
    if dropout:
        core += 2 * t * width * mask_bytes
    return int(out + core)


def _output_bytes(cfg, targets: float, e: int, recompute_output: bool, micro_batch: int) -> float:
    tok, diff = cfg.tokenizer, cfg.diffusion
    cond = cfg.backbone.width if cfg.head.type == "next" else cfg.head.width
    glue = targets * (2 * 8 + 4 + 4)  # index rows/slots, per-target loss and weight
    if tok.is_discrete:
        return targets * (e * cond + 4 * tok.vocab_size + 8) + glue
    rows = targets * diff.batch_mul
    c, w, depth = tok.channels, diff.width, diff.depth
    if recompute_output:  # the region's inputs: z and the targets (the noise draws are the batch's)
        return targets * (cond + c) * e + glue
    per_row = e * (256 + 5 * w + cond + c + depth * 11 * w + 3 * w + c) + 4 * (2 * depth + 2 + 1) + 8
    return rows * per_row + glue


def activation_bytes(cfg, micro_batch: Optional[int] = None, device: str = "cuda",
                     precision: Optional[str] = None, tp: Optional[int] = None,
                     layers: Optional[Dict[str, range]] = None, with_output: bool = True,
                     head_sequences: Optional[Sequence[Tuple[int, float]]] = None) -> Dict[str, float]:
    """{"backbone", "head", "output", "total"}: bytes one micro-batch saves for backward on one rank.

    ``device``: "cuda" (1-byte dropout masks, flash attention) or "cpu" (as the CPU tests measure).
    ``layers``: {"backbone": range, "head": range} held by this pipeline stage (default: all);
    ``with_output``: whether this stage runs the per-token output. ``head_sequences``: the head's computed
    sequences per image as [(slots, count)] (default: the expectation, :func:`.slots.expected_sequences`).
    """
    b = micro_batch or cfg.train.micro_batch_size
    precision = precision or _precision(cfg, device)
    e = _dtype_bytes(precision)
    tp = tp or cfg.parallel.tensor
    mask_bytes = 1 if device == "cuda" else e
    kernel = _attention_kernel(cfg, device)
    tok, bb, head = cfg.tokenizer, cfg.backbone, cfg.head
    n = tok.num_tokens
    rc = recompute_plan(cfg)
    dropout = bb.dropout > 0
    layers = layers or {"backbone": range(bb.depth), "head": range(head.depth if head.type != "next" else 0)}
    out = {"backbone": 0.0, "head": 0.0, "output": 0.0}

    def stack(part, sec, tokens, seq, batch, rope, causal, masked=False):
        chunks = rc["chunks"].get(part, [])
        firsts = {s for s, _ in chunks}
        inside = {i for s, e_ in chunks for i in range(s, e_)}
        total = 0.0
        for i in layers[part]:
            if i in inside:
                total += tokens * sec.width * e if i in firsts or i == layers[part][0] else 0
                continue
            total += layer_activation_bytes(tokens=tokens, seq=seq, batch=batch, width=sec.width,
                                            ffn=int(sec.width * sec.mlp_ratio), heads=sec.num_heads, tp=tp, e=e,
                                            kernel=kernel, rope=rope, causal=causal, dropout=dropout,
                                            mask_bytes=mask_bytes, selective=part in rc["selective"],
                                            masked=masked)
        return total

    if len(layers["backbone"]):
        t = n * b
        out["backbone"] = stack("backbone", bb, t, n, b, bb.pos_embed == "rope2d", True)
        if 0 in layers["backbone"]:  # embeddings: indices / latents
            out["backbone"] += 8 * b + (8 * t if tok.is_discrete else t * tok.channels * e)
        if bb.depth - 1 in layers["backbone"]:  # final LayerNorm
            out["backbone"] += t * bb.width * e + 8 * t
    if head.type != "next" and len(layers["head"]):
        sequences = expected_sequences(cfg) if head_sequences is None else head_sequences
        rope, local = head.pos_embed == "rope2d", head.type == "local"
        t = sum(b * count * length for length, count in sequences)  # computed slots of the micro-batch
        out["head"] = sum(stack("head", head, b * count * length, length, b * count, rope, False, local)
                          for length, count in sequences)
        if 0 in layers["head"]:  # the backbone outputs it projects, the visibility mask, the local mask
            out["head"] += b * n * bb.width * e + t
            if local:  # the packed slots' gather indices (input, learned positions)
                out["head"] += 8 * t * (1 if rope else 2)
            if local and kernel != "flash":  # the boolean window masks (the flash path keeps an additive copy per layer)
                out["head"] += sum(b * count * length * length for length, count in sequences)
        if head.depth - 1 in layers["head"]:
            out["head"] += t * head.width * e + 8 * t
    if with_output:
        targets = targets_per_image(cfg) * b
        out["output"] = _output_bytes(cfg, targets, e, rc["output"], b)
    out["total"] = sum(out.values())
    return out


def _precision(cfg, device: str) -> str:
    p = cfg.parallel.precision
    if p == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return p


def model_state_bytes(cfg, dp: int, precision: str = "bf16", stage_params: Optional[int] = None) -> Dict[str, int]:
    """{"params", "grads", "optimizer"} bytes on one rank (the engine's partitions, see bench/memory.py).

    fp32: 4-byte parameters and gradients, AdamW's two fp32 moments. bf16: 2-byte parameters and
    gradients, plus fp32 master weights and two moments (12 bytes). ZeRO-1 shards the optimizer states over
    ``dp``, ZeRO-2 also the gradients, ZeRO-3 also the parameters. DeepSpeed's ZeRO-1 keeps only the averaged
    gradient partitions after the reduction too, so gradients count as sharded from stage 1 on. Left out: the
    partitions' padding (a few elements) and the parameter that straddles a partition boundary (ZeRO 1-2). ``stage_params``: parameters held by this
    rank before ZeRO (default: the whole model divided over TP).
    """
    if stage_params is None:
        stage_params = sum(v["per_tp_rank"] for v in param_counts(cfg, cfg.parallel.tensor).values())
    zero = cfg.parallel.zero_stage
    p_bytes = 2 if precision == "bf16" else 4
    shard = -(-stage_params // dp)
    params = (shard if zero == 3 else stage_params) * p_bytes
    grads = (shard if zero >= 1 else stage_params) * p_bytes
    if precision == "bf16":
        optimizer = (shard if zero >= 1 else stage_params) * 12
    else:  # fp32: AdamW's moments; at ZeRO 1-2 also the optimizer's fp32 partition of the parameters (at ZeRO-3
        # that partition is the parameters' own ds_tensor)
        optimizer = stage_params * 8 if zero == 0 else shard * (8 if zero == 3 else 12)
    return {"params": params, "grads": grads, "optimizer": optimizer}
