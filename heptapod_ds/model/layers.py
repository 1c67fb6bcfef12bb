"""Megatron-core transformer stacks for the backbone and the head.

One place decides how a stack of Heptapod layers is built: the ``TransformerConfig`` (pre-norm
LayerNorm, GELU MLP with biases, CPU initialization without CUDA) and the layer spec (megatron's
local spec unless ``backbone.transformer_impl=transformer_engine`` is asked for: ``auto`` is local),
with the core attention of ``backbone.attention`` (sdpa / megatron / te) swapped into the spec.

Tensor parallelism: QKV and FC1 are column-parallel, the attention output projection and FC2 are
row-parallel (``tensor_model_parallel=True`` on their weights); LayerNorms are replicated.
"""
from __future__ import annotations

import copy
import functools
import importlib
import logging
from dataclasses import dataclass

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from .attention import ATTENTIONS, core_attention_class

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """TransformerEngine is used only when it imports *and* a GPU is visible."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("transformer_engine")  # the import is the probe
    except Exception:  # noqa: BLE001 - a broken TE install must not break the local path
        return False
    return True


@dataclass(frozen=True)
class LayerImpl:
    """A resolved layer implementation: the megatron spec (local / transformer_engine) and its core attention."""
    transformer: str
    attention: str

    def __str__(self) -> str:
        return f"{self.transformer}+{self.attention}"


def resolve_attention(requested: str, transformer: str) -> str:
    """``auto`` -> TransformerEngine's fused attention inside the TE spec, else SDPA (the fastest measured
    on CPU, and flash attention on a GPU without TE)."""
    if requested not in ATTENTIONS:
        raise ValueError(f"backbone.attention='{requested}' is not one of {', '.join(ATTENTIONS)}.")
    if requested == "auto":
        return "te" if transformer == "transformer_engine" else "sdpa"
    if requested == "te" and transformer != "transformer_engine":
        raise RuntimeError("backbone.attention=te needs TransformerEngine layers (transformer_engine installed, "
                           "a CUDA device, backbone.transformer_impl=auto or transformer_engine); use "
                           "attention=sdpa (or megatron) here.")
    return requested


def resolve_impl(requested: str, attention: str = "auto") -> LayerImpl:
    """Resolve ``backbone.transformer_impl`` and ``backbone.attention`` for this machine."""
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(f"backbone.transformer_impl='{requested}' is not one of "
                         f"{', '.join(TRANSFORMER_IMPLS)}.")
    if requested == "auto":
        # TransformerEngine only when asked for: its layers have not been checked in a training run yet
        transformer = "local"
        if transformer_engine_available():
            _log_te_switch_once()
    elif requested == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError("backbone.transformer_impl=transformer_engine needs the transformer_engine "
                           "package and a CUDA device; use transformer_impl=local (or auto) on this machine.")
    else:
        transformer = requested
    return LayerImpl(transformer, resolve_attention(attention, transformer))


@functools.lru_cache(maxsize=1)
def _log_te_switch_once() -> None:
    logging.getLogger(__name__).info(
        "TransformerEngine is installed but backbone.transformer_impl=auto uses megatron's local layers (TE layers "
        "have not been checked in a training run yet); pass backbone.transformer_impl=transformer_engine "
        "(and backbone.attention=te for its fused attention) to use them.")


def run_precision(cfg) -> str:
    """``parallel.precision`` with ``auto`` made concrete (bf16 with CUDA, fp32 on CPU), as the engine resolves it."""
    precision = cfg.parallel.precision
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def as_impl(impl) -> LayerImpl:
    """Accept a resolved :class:`LayerImpl` or a bare spec name (attention: megatron's own for that spec)."""
    if isinstance(impl, LayerImpl):
        return impl
    if impl not in ("local", "transformer_engine"):
        raise ValueError(f"unresolved transformer implementation '{impl}'; call resolve_impl() first.")
    return LayerImpl(impl, "te" if impl == "transformer_engine" else "megatron")


def make_transformer_config(*, depth: int, width: int, num_heads: int, mlp_ratio: float, dropout: float,
                            norm_eps: float, tensor_parallel: int, params_dtype: torch.dtype = torch.float32,
                            init_std: float = 0.02, precision: str = "fp32") -> TransformerConfig:
    """Pre-norm GPT-style layers; every CUDA-only fusion is off so the same config runs on CPU.

    ``precision`` is the run's (:func:`run_precision`): with bf16 megatron is told so (``bf16=True``) and
    its softmax runs in fp32 (``attention_softmax_in_fp32``). The parameters are still created in
    ``params_dtype`` (fp32): DeepSpeed casts them and keeps the fp32 master weights, which therefore start
    from the fp32 initialisation.
    """
    ffn = int(width * mlp_ratio)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=depth, hidden_size=width, num_attention_heads=num_heads, ffn_hidden_size=ffn,
        hidden_dropout=dropout, attention_dropout=dropout, layernorm_epsilon=norm_eps,
        normalization="LayerNorm", add_bias_linear=True, gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu, init_method_std=init_std,
        tensor_model_parallel_size=tensor_parallel, sequence_parallel=False,
        use_cpu_initialization=not on_gpu, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        apply_residual_connection_post_layernorm=False,
        bf16=precision == "bf16", attention_softmax_in_fp32=True,
    )


def layer_spec(impl, mask_type: AttnMaskType):
    """Megatron layer spec for ``impl`` (a :class:`LayerImpl` or a spec name), self-attention of ``mask_type``.

    Only the spec's core-attention entry changes with ``impl.attention``: it owns no parameters, so the
    model's structure and parameter names are the same for every attention.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    impl = as_impl(impl)
    if impl.transformer == "transformer_engine":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    elif impl.transformer == "local":
        spec = gpt_layer_specs.get_gpt_layer_local_spec()
    else:
        raise ValueError(f"unresolved transformer implementation '{impl}'; call resolve_impl() first.")
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params or {}, attn_mask_type=mask_type)
    core = core_attention_class(impl.attention, impl.transformer)
    if core is not None:
        attn.submodules.core_attention = core
    if impl.transformer == "local":  # the bias inside the matmul at TP = 1 (linears.py); TE fuses its own
        from .linears import FoldedColumnParallelLinear, FoldedRowParallelLinear

        attn.submodules.linear_qkv, attn.submodules.linear_proj = FoldedColumnParallelLinear, FoldedRowParallelLinear
        mlp = spec.submodules.mlp.submodules
        mlp.linear_fc1, mlp.linear_fc2 = FoldedColumnParallelLinear, FoldedRowParallelLinear
    return spec


def build_stack(config: TransformerConfig, impl, mask_type: AttnMaskType,
                pre_process: bool = True, post_process: bool = True) -> TransformerBlock:
    """A TransformerBlock (with its final LayerNorm when ``post_process``) of ``config.num_layers`` layers."""
    return TransformerBlock(config=config, spec=layer_spec(impl, mask_type), post_layer_norm=post_process,
                            pre_process=pre_process, post_process=post_process)


def count_tp_aware(module: torch.nn.Module, tp_size: int) -> int:
    """Parameters of the *full* model: TP-sharded tensors count ``tp_size`` times their local size."""
    total = 0
    for p in module.parameters():
        total += p.numel() * (tp_size if getattr(p, "tensor_model_parallel", False) else 1)
    return total

