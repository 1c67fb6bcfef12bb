"""Sampling from a model split into pipeline stages: one token step at a time through the stages.

Every stage of a pipeline group calls :func:`pipelined_generate` with the same labels and seeds. At
step t the first stage embeds slot t, each stage runs its backbone layers on that one slot against its
own KV cache (the cache of its layers only) and passes the ``[1, B, backbone.width]`` activation on;
the stage holding the head's input keeps the backbone outputs ``o_0..o_t`` and builds the head's
``N + 1`` slots for timestep t; the head layers run on them (``[N + 1, B, head.width]`` between stages);
the last stage draws token ``x_{t+1}`` with the per-image generators and broadcasts it to every stage,
whose next step needs it (the first stage embeds it; the others keep the token grid they return).

The arithmetic is the one of :meth:`HeptapodModel.generate` (same modules, same order, same draws from
the same per-image generators), so the samples equal those of PP = 1 for the same seeds.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from heptapod_ds.sampling.seeds import generators


def _neighbours():
    from megatron.core import parallel_state as mps

    return (mps.get_pipeline_model_parallel_prev_rank(), mps.get_pipeline_model_parallel_next_rank(),
            mps.get_pipeline_model_parallel_group(), mps.get_pipeline_model_parallel_last_rank())


def _send(t: torch.Tensor, dst: int) -> None:
    dist.send(t.contiguous(), dst=dst)


def _recv(shape, dtype, device, src: int) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(t, src=src)
    return t


@torch.no_grad()
def pipelined_generate(stage, labels: torch.Tensor, seeds: torch.Tensor, temperature: Optional[float] = None,
                       top_k: Optional[int] = None, num_steps: Optional[int] = None) -> torch.Tensor:
    """Tokens ``[B, N]`` (discrete) or ``[B, N, C]`` on every stage; collective over the pipeline group."""
    from heptapod_ds.model.heptapod import _check_labels, _make_cache, check_batch_values, device_scope

    model = stage._model
    batch = labels.shape[0]
    _check_labels(labels, batch, model.num_classes)
    if labels.device.type == "cpu":
        check_batch_values(None, labels, None, model.num_classes)
    gens = generators(seeds)
    if len(gens) != batch:
        raise ValueError(f"seeds must hold one seed per image: {len(gens)} seeds for {batch} labels.")
    temperature, top_k, num_steps = model.sampling_settings(temperature, top_k, num_steps)
    device = labels.device
    dtype = next(stage.parameters()).dtype
    prev_rank, next_rank, group, last_rank = _neighbours()
    links = stage.stage.links
    bb_layers = stage.stage.layer_indices("backbone")
    head_layers = stage.stage.layer_indices("head")
    cfg = model.cfg
    n = model.num_tokens
    tokens = model.empty_tokens(batch, device)
    cache = _make_cache(batch, n) if bb_layers else None
    prefix = []
    was_training = stage.training
    stage.eval()
    scope = contextlib.ExitStack()
    scope.enter_context(device_scope(device))  # megatron allocates the KV cache on the current CUDA device
    try:
        for t in range(n):
            # --- backbone: one slot (t) through this stage's layers, with their KV cache
            if "embed" in links:
                h, _ = model.backbone.embed(labels, tokens[:, :t], start=t, cached=True)
            elif bb_layers or (not stage.is_first and _receives_backbone(stage)):
                h = _recv((1, batch, cfg.backbone.width), dtype, device, prev_rank)
            else:
                h = None
            if bb_layers:
                rotary = model.backbone.rotary(t, 1, cached=True)
                for i in bb_layers:
                    h, _ = model.backbone.decoder.layers[str(i)](hidden_states=h, attention_mask=None,
                                                                rotary_pos_emb=rotary, inference_context=cache)
                cache.sequence_len_offset += 1
                if model.backbone.decoder.final_layernorm is not None:
                    h = model.backbone.decoder.final_layernorm(h)
            # --- head: the slots it reads at timestep t (all N + 1; the local head: prefix and window)
            steps = torch.full((batch, 1), t, dtype=torch.long, device=device)
            length = model.head.sampling_length(t) if model.head is not None else 1
            if "head_input" in links:
                prefix.append(h.transpose(0, 1))                                  # o_t: [B, 1, Wb]
                h = model.head.embed(torch.cat(prefix, dim=1), steps, num_slots=length)   # [S, B, Wh]
            elif head_layers:
                h = _recv((length, batch, cfg.head.width), dtype, device, prev_rank)
            elif "output" in links and not bb_layers and "embed" not in links:
                width = cfg.head.width if model.head is not None else cfg.backbone.width
                h = _recv((length, batch, width), dtype, device, prev_rank)
            if head_layers:
                kwargs = model.head.layer_kwargs(steps, num_slots=length)
                for j in head_layers:
                    h, _ = model.head.decoder.layers[str(j)](hidden_states=h, **kwargs)
                if model.head.decoder.final_layernorm is not None:
                    h = model.head.decoder.final_layernorm(h)
            # --- the last stage draws x_{t+1}; every stage learns it
            if stage.is_last:
                z = h[0] if model.head is None else h[t + 1]                      # [B, D]
                tokens[:, t] = model.sample_token(z, gens, temperature, top_k, num_steps).to(tokens.dtype)
            else:
                _send(h, next_rank)
            row = tokens[:, t].contiguous()
            if row.dtype != torch.long:
                row = row.to(torch.float32)
            dist.broadcast(row, src=last_rank, group=group)
            tokens[:, t] = row.to(tokens.dtype)
    finally:
        scope.close()
        stage.train(was_training)
    return tokens


def _receives_backbone(stage) -> bool:
    """A stage without backbone layers that still gets a backbone activation: the head's input stage."""
    return "head_input" in stage.stage.links
