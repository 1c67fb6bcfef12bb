"""Canonical parameter names and the parameter table of a model config.

A canonical name is the name of the parameter in the full (TP=1, PP=1) model built with megatron's
*local* layer spec, e.g. ``backbone.decoder.layers.3.input_layernorm.weight``. TransformerEngine's
spec fuses the pre-attention / pre-MLP LayerNorms into the following linear layer and names them
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``; :func:`to_canonical` and
:func:`from_canonical` translate. Pipeline stages (when they exist) must report global layer
indices; their stage-local names are mapped by the reader of their files.

:func:`model_spec` lists, for a config, every parameter's canonical name, full shape, TP split
dimension (megatron's ``partition_dim``; None = replicated) and optimizer group, in the order of
``model.named_parameters()``. It builds the model on the ``meta`` device: no memory, any preset.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

# (TransformerEngine name suffix, local name suffix)
_TE_TO_LOCAL = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".self_attention.linear_qkv.layer_norm_bias", ".input_layernorm.bias"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias"),
)
_EXTRA_STATE = re.compile(r"\._extra_state$")
# ``_extra_state`` entries (FP8 metadata) of a TransformerEngine-spec layer beyond those the local spec's
# linears keep too: TE's fused core attention, which has no local counterpart.
_TE_ONLY_EXTRA_STATE = (".self_attention.core_attention._extra_state",)
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.self_attention\.linear_qkv\.weight$")


def to_canonical(name: str) -> str:
    """Local-spec name of a (local or TransformerEngine) parameter name."""
    for te, local in _TE_TO_LOCAL:
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def from_canonical(name: str, impl: str) -> str:
    """The name of canonical parameter ``name`` in a model built with layer implementation ``impl``."""
    if impl != "transformer_engine":
        return name
    for te, local in _TE_TO_LOCAL:
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


def te_parameter_order(names: List[str]) -> List[str]:
    """Canonical ``names`` (in a local-spec model's ``named_parameters()`` order) in the order a TE-spec
    model lists the same parameters.

    The local spec registers ``input_layernorm`` / ``pre_mlp_layernorm`` as modules of their own before
    the attention / MLP; TE's ``LayerNormLinear`` owns them and registers ``layer_norm_weight`` and
    ``layer_norm_bias`` before its ``weight`` and ``bias``. So each fused norm moves to just before the
    first parameter of the linear that absorbs it (megatron's attention registers ``linear_proj`` before
    ``linear_qkv``, so the input norm moves past it). ZeRO's flat partitions, the optimizer's state
    indices and the EMA follow this order."""
    moving: Dict[str, List[str]] = {}
    rest = []
    for n in names:
        for te, local in _TE_TO_LOCAL:
            if n.endswith(local):
                owner = n[: -len(local)] + te.rsplit(".", 1)[0]  # e.g. layers.3.self_attention.linear_qkv
                moving.setdefault(owner, []).append(n)
                break
        else:
            rest.append(n)
    out = []
    for n in rest:
        out += moving.pop(n.rsplit(".", 1)[0], [])
        out.append(n)
    if moving:
        raise ValueError(f"fused LayerNorms without the linear that absorbs them under TransformerEngine: "
                         f"{sorted(moving)[:3]}; the TE mapping of heptapod_ds/checkpoint/names.py does not "
                         f"fit this model.")
    return out


def te_extra_state_names(names: List[str], attention: str) -> List[str]:
    """``_extra_state`` entries a TE-spec model has and the local one lacks, for its canonical parameter
    ``names``: TE's fused core attention (``attention == "te"``) in every layer."""
    if attention != "te":
        return []
    layers = [m.group(1) for n in names if (m := _LAYER.match(n))]
    return [layer + suffix for layer in layers for suffix in _TE_ONLY_EXTRA_STATE]


def is_extra_state(name: str) -> bool:
    """TransformerEngine / megatron ``_extra_state`` entries of a state dict (no tensor data we need)."""
    return bool(_EXTRA_STATE.search(name))


@dataclass(frozen=True)
class ParamSpec:
    name: str                 # canonical name
    shape: Tuple[int, ...]    # full (TP=1) shape
    split_dim: Optional[int]  # TP split dimension; None = replicated on every TP rank
    group: int                # index of the optimizer param group (engine.optim.param_groups order)
    decay: bool = True        # the group has weight decay

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def local_shape(self, tp: int) -> Tuple[int, ...]:
        if self.split_dim is None or tp == 1:
            return self.shape
        if self.shape[self.split_dim] % tp:
            raise ValueError(f"'{self.name}': size {self.shape[self.split_dim]} along dim {self.split_dim} "
                             f"is "
                             f"not divisible by tensor={tp}.")
        s = list(self.shape)
        s[self.split_dim] //= tp
        return tuple(s)

    def shard(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """TP rank ``rank``'s piece of the full tensor (a view when the split is along dim 0)."""
        if self.split_dim is None or tp == 1:
            return full
        return full.chunk(tp, dim=self.split_dim)[rank]

    def join(self, shards: List[torch.Tensor]) -> torch.Tensor:
        if self.split_dim is None or len(shards) == 1:
            return shards[0]
        return torch.cat(shards, dim=self.split_dim)


def saved_config(data: Dict, where) -> "object":
    """The HeptapodConfig of a saved run (checkpoint meta, release config.json).

    Keys this version of the code no longer has are dropped with a warning naming them, so that an
    old checkpoint stays convertible; the fields that define the model are checked by the callers.
    """
    import logging

    from heptapod_ds.config.loader import all_keys, from_dict

    known = set(all_keys())

    def prune(d: Dict, prefix: str, dropped: List[str]) -> Dict:
        out = {}
        for k, v in d.items():
            dotted = prefix + str(k)
            if isinstance(v, dict) and any(key.startswith(dotted + ".") for key in known):
                out[k] = prune(v, dotted + ".", dropped)
            elif dotted in known:
                out[k] = v
            else:
                dropped.append(dotted)
        return out

    dropped: List[str] = []
    pruned = prune(data, "", dropped)
    if dropped:
        logging.getLogger(__name__).warning("%s: ignoring config keys this version does not have: %s", where,
                                            ", ".join(dropped))
    return from_dict(pruned)


def model_spec(cfg) -> List[ParamSpec]:
    """The parameter table of ``cfg``'s model (see the module docstring).

    Needs megatron's parallel state (any TP size: local shapes are scaled back to full ones).
    """
    from heptapod_ds.engine.optim import split_decay
    from heptapod_ds.model.heptapod import HeptapodModel
    from megatron.core import parallel_state as mps

    tp = mps.get_tensor_model_parallel_world_size()
    with torch.device("meta"):
        model = HeptapodModel(cfg, impl="local", tensor_parallel=tp)
    decay, no_decay = split_decay(model)
    groups = [g for g in (decay, no_decay) if g]
    group_of: Dict[str, int] = {n: i for i, g in enumerate(groups) for n in g}
    specs = []
    for name, p in model.named_parameters():
        split = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        shape = list(p.shape)
        if split is not None:
            shape[split] *= tp
        specs.append(ParamSpec(name, tuple(shape), split, group_of[name], name in set(decay)))
    return specs


def group_order(specs: List[ParamSpec]) -> List[List[ParamSpec]]:
    """Parameters per optimizer group, in the order DeepSpeed flattens them (the group's order)."""
    groups: Dict[int, List[ParamSpec]] = {}
    for s in specs:
        groups.setdefault(s.group, []).append(s)
    return [groups[g] for g in sorted(groups)]
