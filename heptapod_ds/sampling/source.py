"""What to sample from: a release folder (tools/convert_ckpt.py to-release) or a training checkpoint.

``load_sampling_source(path, weights)`` returns the validated one-process config, the full canonical
weights (the EMA by default) and a short description of where they came from; every problem (no such
folder, no EMA, missing tokenizer weights) is an error here, before any model is built or sampled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from heptapod_ds.monitor import get_logger

log = get_logger(__name__)


@dataclass
class SamplingSource:
    cfg: Any
    state: Dict[str, torch.Tensor]
    kind: str          # "release" | "checkpoint"
    path: str
    weights: str       # "ema" | "raw"
    identity: str      # changes when the weights change (release sha256 / checkpoint step + path)
    step: Optional[int]


def check_tokenizer_weights(cfg, override: Optional[str] = None) -> None:
    """kl16/vq16 decode through local weights: refuse a missing file before sampling anything."""
    tok = cfg.tokenizer
    if override:
        tok.ckpt = override
    if tok.name in ("kl16", "vq16") and not (tok.ckpt and os.path.isfile(os.path.expanduser(tok.ckpt))):
        raise FileNotFoundError(
            f"the model decodes through the {tok.name} tokenizer, whose weights tokenizer.ckpt={tok.ckpt!r} "
            f"are not a file on this machine; pass --tokenizer-ckpt PATH (MAR's kl16.ckpt / LlamaGen's "
            f"vq_ds16_c2i.pt). Nothing is downloaded.")


def load_sampling_source(path: str, weights: str = "ema") -> SamplingSource:
    from heptapod_ds.checkpoint.release import RELEASE_FILE, is_release, load_release

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--ckpt {path}: no such file or folder (a release folder with model.safetensors "
                                f"+ config.json, or a training run / checkpoints / global_stepN folder).")
    if is_release(p):
        cfg, state = load_release(p, verify=True)
        info = json.loads((p / RELEASE_FILE).read_text()) if (p / RELEASE_FILE).is_file() else {}
        stored = info.get("weights", "unknown")
        if weights == "raw" and stored == "ema":
            raise ValueError(f"release {path} holds EMA weights only; drop --weights raw or export the raw "
                             f"weights with tools/convert_ckpt.py to-release.")
        ident = hashlib.sha256(json.dumps(info.get("files", {}), sort_keys=True).encode()).hexdigest()[:16]
        step = (info.get("source") or {}).get("step")
        log.info("release %s (%s weights, %d tensors)", path, stored, len(state))
        return SamplingSource(cfg, {k: v.float() for k, v in state.items()}, "release", str(p.resolve()), stored,
                              f"release:{ident}", step)
    from heptapod_ds.checkpoint.reader import TrainingCheckpoint
    from heptapod_ds.checkpoint.release import one_process_config

    ckpt = TrainingCheckpoint(p)
    cfg = one_process_config(ckpt.cfg)
    kind = "ema" if weights == "ema" else "fp32"
    if kind == "ema" and not ckpt.has_ema:
        raise ValueError(f"checkpoint {ckpt.dir} has no EMA (trained with train.ema_decay=0); pass --weights raw.")
    state = ckpt.tensors(kind)
    log.info("training checkpoint %s (step %d, %s weights, %d tensors)", ckpt.dir, ckpt.step, weights, len(state))
    return SamplingSource(cfg, state, "checkpoint", str(ckpt.dir.resolve()), weights,
                          f"checkpoint:{ckpt.dir.resolve()}:step{ckpt.step}", ckpt.step)


def sampler_precision(device, precision: str = "auto") -> str:
    """``auto``: bf16 weights on a GPU, fp32 on the CPU (where CPU runs keep their samples bit for bit)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}.")
    if precision == "auto":
        return "bf16" if torch.device(device or "cpu").type == "cuda" else "fp32"
    return precision


def cast_weights(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Floating-point *parameters* to bf16 for ``precision="bf16"``; buffers (rotary frequencies) stay fp32,
    as DeepSpeed's bf16 engine leaves them in training. The model's own sampler keeps its DDPM chain in
    fp32 (``DiffusionLoss.sample``) and its categorical draws on fp32 probabilities."""
    if precision == "bf16":
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    return model


@contextlib.contextmanager
def sampler_math(device):
    """TF32 for matmul and cuDNN inside the block on a GPU (restored afterwards); nothing on the CPU.

    The Inception features are extracted outside it, in full fp32, as the reference statistics were."""
    if torch.device(device or "cpu").type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        before = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = before
        return
    before = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        yield
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def build_sampling_model(source: SamplingSource, device=None, precision: str = "auto"):
    """The source's model (TP=1 on this rank) in eval mode with its weights loaded; bf16 weights on a GPU
    (``precision="auto"``), fp32 on the CPU."""
    from heptapod_ds.checkpoint.release import load_state_into
    from heptapod_ds.model import build_model

    model = build_model(source.cfg, device=device)
    load_state_into(model, source.state, where=source.path)
    dev = device if device is not None else next(model.parameters()).device
    return cast_weights(model, sampler_precision(dev, precision)).eval()
