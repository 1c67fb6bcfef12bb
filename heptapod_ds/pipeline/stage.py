"""One pipeline stage of the Heptapod model, cut from the whole model by module names (torchtitan style).

Every stage builds the *whole* :class:`HeptapodModel` with the same seed (so a PP run starts from the
weights of a PP=1 run), then :func:`prune` drops every module outside the stage's links (see
:mod:`heptapod_ds.pipeline.split`) and :class:`PipelineStage` adopts what is left. The model's modules
know nothing of stages: the stage runs their pieces (``backbone.embed``, single layers, ``head.embed``,
``loss_from_features``) in chain order.

Parameter names stay those of the PP=1 model. A stage's ``state_dict()`` is a subset of the full
model's, e.g. stage 1 of a ``20,4`` split holds ``head.decoder.layers.4.*`` .. ``head.decoder.layers.7.*``
and ``output.*`` under exactly these names; :func:`merge_stage_state_dicts` joins the stages' dicts
into the full model's (a checked union), and :func:`stage_parameter_names` says which names a stage
holds without building anything. Layers kept by a stage sit in a ``ModuleDict`` keyed by their index
in the full model, which is what keeps the names.

Communication between stages is Megatron-core's: the schedule calls :meth:`PipelineStage.set_input_tensor`
with the activation received from the previous stage, and sends what ``forward`` returns.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from .split import PipelineSplit, Stage


def _module_paths(stage: Stage, model) -> List[str]:
    """Names (in the full model) of the modules and parameters that carry ``stage``'s links."""
    paths: List[str] = []
    for link in stage.links:
        if link == "embed":
            paths += ["backbone.class_embed", "backbone.token_embed"]
            if not model.backbone.use_rope:
                paths.append("backbone.pos_embed")
        elif link.startswith("backbone."):
            paths.append(f"backbone.decoder.layers.{link.split('.')[1]}")
        elif link == "head_input":
            paths += ["head.input_proj", "head.mask_token"]
            if not model.head.use_rope:
                paths.append("head.pos_embed")
        elif link.startswith("head."):
            paths.append(f"head.decoder.layers.{link.split('.')[1]}")
        elif link == "output":
            paths.append("output")
    return paths


def prune(model, split: PipelineSplit, stage: int) -> None:
    """Drop from ``model`` (in place) every module and parameter that ``stage`` does not run."""
    spec = split.stages[stage]
    blocks = [("backbone", model.backbone, split.owns_last_backbone_layer(stage))]
    if model.head is not None:
        blocks.append(("head", model.head, split.owns_last_head_layer(stage)))
    for name, block, owns_final_norm in blocks:
        keep = spec.layer_indices(name)
        block.decoder.layers = nn.ModuleDict({str(i): block.decoder.layers[i] for i in keep})
        if not owns_final_norm:
            block.decoder.final_layernorm = None
    if not spec.has("embed"):
        for attr in ("class_embed", "token_embed", "pos_embed"):
            if hasattr(model.backbone, attr):
                setattr(model.backbone, attr, None)
    if model.head is not None and not spec.has("head_input"):
        model.head.input_proj = None
        if not model.head.use_rope:
            model.head.pos_embed = None
        model.head.mask_token = None
    if not spec.has("output"):
        model.output = None


def stage_parameter_names(full_names: Iterable[str], model, split: PipelineSplit, stage: int) -> List[str]:
    """Which of the full model's parameter names ``stage`` holds (for checkpoint tools)."""
    spec = split.stages[stage]
    prefixes = tuple(p + "." for p in _module_paths(spec, model)) + tuple(_module_paths(spec, model))
    names = []
    for n in full_names:
        if n.startswith(prefixes) or n in prefixes:
            names.append(n)
        elif n.startswith("backbone.decoder.final_layernorm") and split.owns_last_backbone_layer(stage):
            names.append(n)
        elif n.startswith("head.decoder.final_layernorm") and split.owns_last_head_layer(stage):
            names.append(n)
    return names


def merge_stage_state_dicts(stage_dicts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The full model's state dict from the stages' (names are already the full model's)."""
    full: Dict[str, torch.Tensor] = {}
    for k, sd in enumerate(stage_dicts):
        for name, value in sd.items():
            if name in full:
                raise ValueError(f"'{name}' is held by two pipeline stages (stage {k} and an earlier one); "
                                 f"these state dicts are not one split of one model.")
            full[name] = value
    return full


def pipeline_transformer_config(config, pipeline: int):
    """The config Megatron's schedule reads: shapes exchanged before each send (they change at the
    backbone-to-head boundary), everything else as in the layers' config."""
    out = copy.copy(config)  # not dataclasses.replace: __post_init__ refuses MoE-only combinations
    out.variable_seq_lengths = True
    out.deallocate_pipeline_outputs = False
    return out


class PipelineStage(nn.Module):
    """The links of one stage; ``forward(tokens, labels, sample_seeds)`` returns ``(activation, {})`` on
    every stage but the last, and ``(loss, stats)`` there, like :meth:`HeptapodModel.forward`."""

    def __init__(self, model, split: PipelineSplit, stage: int):
        super().__init__()
        prune(model, split, stage)
        self.split = split
        self.stage = split.stages[stage]
        self.is_first = stage == 0
        self.is_last = stage == len(split.stages) - 1
        self.backbone = model.backbone if any(l == "embed" or l.startswith("backbone.")
                                              for l in self.stage.links) else None
        self.head = model.head if model.head is not None and any(
            l.startswith("head") for l in self.stage.links) else None
        self.output = model.output
        adopted = {id(p) for p in self.parameters()}
        lost = [n for n, p in model.named_parameters() if id(p) not in adopted]
        if lost:
            raise RuntimeError(f"pipeline stage {stage} dropped parameters it should run: {lost[:3]}; "
                               f"the split and the pruning disagree.")
        # the pruned whole model: its methods (draws, loss) run on the adopted modules
        self.__dict__["_model"] = model
        self.cfg = model.cfg
        base = model.backbone.config
        self.config = pipeline_transformer_config(base, len(split.stages))
        self.model_type = _encoder_or_decoder()
        self._input: Optional[torch.Tensor] = None

    # megatron's schedule hands the received activation through this
    def set_input_tensor(self, tensors) -> None:
        self._input = tensors[0] if isinstance(tensors, (list, tuple)) else tensors

    def no_weight_decay(self):
        own = {n for n, _ in self.named_parameters()}
        return {n for n in self._model.no_weight_decay() if n in own}

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, seeds: torch.Tensor, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, num_steps: Optional[int] = None,
                 use_kv_cache: bool = True) -> torch.Tensor:
        """:meth:`HeptapodModel.generate` across the stages (collective over the pipeline group; every
        stage passes the same labels and seeds and gets the tokens)."""
        from .generate import pipelined_generate

        if not use_kv_cache:
            raise ValueError("pipelined generation always uses the KV cache (each stage caches its own layers); "
                             "compare against HeptapodModel.generate(use_kv_cache=False) at PP=1.")
        return pipelined_generate(self, labels, seeds, temperature, top_k, num_steps)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor,
                sample_seeds: Optional[torch.Tensor] = None, draws=None):
        """``draws``: as :meth:`HeptapodModel.forward` (every stage gets the same micro-batch and draws)."""
        model, links = self._model, self.stage.links
        if self.is_first:
            model._check_inputs(tokens, labels, sample_seeds, draws)
        if draws is None:
            draws = model.draw_randomness(tokens, labels, sample_seeds)
        h = None if self.is_first else self._input
        if h is None and not self.is_first:
            raise RuntimeError(f"pipeline stage {self.stage.index} got no input activation; it runs under "
                               f"Megatron's schedule, which calls set_input_tensor first.")
        if "embed" in links:
            h, _ = model.backbone.embed(draws.labels(labels, model.num_classes), tokens[:, :model.num_tokens - 1])
        bb_layers = self.stage.layer_indices("backbone")
        if bb_layers:
            rotary = model.backbone.rotary(0, h.shape[0])
            for i in bb_layers:
                h, _ = model.backbone.decoder.layers[str(i)](hidden_states=h, attention_mask=None,
                                                            rotary_pos_emb=rotary)
            if model.backbone.decoder.final_layernorm is not None:
                h = model.backbone.decoder.final_layernorm(h)
        if "head_input" in links:
            h = model.head.embed(h.transpose(0, 1), draws.plan.timesteps, draws.packed)
        head_layers = self.stage.layer_indices("head")
        if head_layers:
            kwargs = model.head.layer_kwargs(draws.plan.timesteps, draws.packed)
            for j in head_layers:
                h, _ = model.head.decoder.layers[str(j)](hidden_states=h, **kwargs)
            if model.head.decoder.final_layernorm is not None:
                h = model.head.decoder.final_layernorm(h)
        if "output" in links:
            return model.loss_from_features(h, tokens, draws)
        return h.contiguous(), {}


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder
