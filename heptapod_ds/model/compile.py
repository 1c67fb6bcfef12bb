"""``train.compile``: ``torch.compile`` of every Transformer layer of backbone and head, one layer at a time.

Why per layer (as torchtitan's ``apply_compile`` does per TransformerBlock): the layers of a stack are
identical in structure, so Dynamo traces ``TransformerLayer.forward`` once and every layer of the stack reuses
that code (one graph per input shape: one for the backbone, one for the head); compile time does not grow with
depth, and what lies between the layers (embeddings, the head's input, the loss, DeepSpeed's hooks) stays eager.

Why in place: each layer's ``forward`` becomes an instance attribute (as :mod:`.recompute` does), never an
``OptimizedModule`` wrapper, so module names, parameter names, state_dict keys and checkpoints are those of the
eager model (no ``_orig_mod.`` prefix). Applied after the model is built (TP shards, recompute wrappers) and
before ``deepspeed.initialize`` (:func:`heptapod_ds.engine.builder.build_engine`); Dynamo compiles on the
first call, i.e. after DeepSpeed has cast and placed the parameters.

Only the training path is compiled: a call with gradients on and no KV cache. Sampling and evaluation (no
gradients; the KV cache and the cut head sequences change shapes at every step, which would recompile each
step) run the eager forward of the same layer, so they give the eager results.

With activation recompute, recompute stays outside the compiled code: ``full`` checkpoints a compiled layer
(eager ``torch.utils.checkpoint`` around it, RNG replay as before), ``selective`` leaves the core attention's
checkpointed region eager inside the compiled layer (a graph break: ``torch.compiler.disable``). The local head
gets the same exclusion: its core attention splits the packed length groups (``packed_seq_params``) with host
values that change every step, so its layers are compiled around it (two graphs per layer, not fullgraph) with
a symbolic packed length (``dynamic=True``: one compile, not one per length). Every other stack is compiled
``fullgraph=True`` (a graph break there would be a silent slow path) with static shapes.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List

import torch
from torch import nn

from .recompute import ChunkFirst, ChunkRest, Recomputed

log = logging.getLogger(__name__)


class CompiledForward:
    """A layer's forward: compiled on the training path (gradients on, no KV cache), eager otherwise."""

    def __init__(self, forward, **compile_kwargs):
        self.eager = forward
        self.compiled = torch.compile(forward, **compile_kwargs)

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled() and kwargs.get("inference_context") is None \
                and kwargs.get("inference_params") is None:
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


class EagerRegion:
    """A submodule's forward left out of the compiled layer around it (Dynamo breaks the graph there)."""

    def __init__(self, forward):
        self.forward = forward
        self._disabled = torch.compiler.disable(forward, recursive=True)

    def __call__(self, *args, **kwargs):
        return self._disabled(*args, **kwargs)


def stacks(model: nn.Module) -> Dict[str, nn.Module]:
    """The layer stacks (``decoder.layers``: a ModuleList, or a ModuleDict in a pipeline stage) by part."""
    out = {}
    for part in ("backbone", "head"):
        sub = getattr(model, part, None)
        decoder = getattr(sub, "decoder", None) if sub is not None else None
        if decoder is not None and getattr(decoder, "layers", None) is not None:
            out[part] = decoder.layers
    return out


def _layers(container) -> List[nn.Module]:
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


def _compile_forward(layer: nn.Module, **kwargs) -> None:
    """Replace the layer's own forward by a :class:`CompiledForward`, under a recompute wrapper if any."""
    current = layer.__dict__.get("forward")
    if isinstance(current, CompiledForward) or isinstance(getattr(current, "forward", None), CompiledForward):
        return  # applied once
    if current is None:
        layer.forward = CompiledForward(layer.forward, **kwargs)
    elif isinstance(current, Recomputed):
        current.forward = CompiledForward(current.forward, **kwargs)
    elif isinstance(current, ChunkFirst):
        forwards = current.chunk.forwards
        if not isinstance(forwards[0], CompiledForward):
            forwards[0] = CompiledForward(forwards[0], **kwargs)
    elif isinstance(current, ChunkRest):
        forwards = current.chunk.forwards
        i = next(k for k, f in enumerate(forwards) if f is current.forward or f == current.forward)
        forwards[i] = current.forward = CompiledForward(current.forward, **kwargs)
    else:
        raise TypeError(f"train.compile: {type(layer).__name__}.forward is replaced by a "
                        f"{type(current).__name__}, which this module does not know how to compile under.")


def _exclude(module: nn.Module) -> None:
    current = module.__dict__.get("forward")
    if not isinstance(current, EagerRegion):
        module.forward = EagerRegion(module.forward)


_POLYFILLED = False


def _megatron_polyfills() -> None:
    """Let Dynamo trace megatron's tensor-parallel linears: ``get_tensor_model_parallel_group_if_none`` warns (a
    DeprecationWarning that Dynamo cannot trace, measured: "Attempted to call function marked as skipped:
    _warnings.warn") when it is passed ``tp_group=None``, which ``RowParallelLinear.forward`` does on every
    call. The polyfill is the same function without the warning; it applies to traced code only."""
    global _POLYFILLED
    if _POLYFILLED:
        return
    import megatron.core.utils as mcu
    from megatron.core import parallel_state as mps

    @torch.compiler.substitute_in_graph(mcu.get_tensor_model_parallel_group_if_none)
    def _tp_group_if_none(tp_group, is_expert=False, check_initialized=True):
        if not torch.distributed.is_initialized():
            return None
        if not mps.is_initialized():
            return tp_group
        if tp_group is None:
            if is_expert:
                return mps.get_expert_tensor_parallel_group(check_initialized=check_initialized)
            return mps.get_tensor_model_parallel_group(check_initialized=check_initialized)
        return tp_group

    _POLYFILLED = True


def _compile_workers() -> None:
    """No compile-worker pool without a GPU: Inductor's pool is a ThreadPoolExecutor whose (non-daemon) thread lives
    until the interpreter's own shut-down, and :func:`heptapod_ds.distributed.process_exit.exit_process` joins the
    non-daemon threads before that, so a finished run never exited (measured: train.py and the test ranks hung
    after their last step). On a CPU the kernels compile in this thread; with a GPU the pools are kept (Triton
    compiles in parallel) and :func:`release_compile_workers` shuts them down at the end of a run."""
    if not torch.cuda.is_available():
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1


def release_compile_workers() -> None:
    """Shut down Inductor's compile-worker pools (threads and processes), if any were started."""
    try:
        from torch._inductor import async_compile
    except Exception:  # noqa: BLE001 - nothing compiled, nothing to release
        return
    async_compile.shutdown_compile_workers()
    pool = async_compile.AsyncCompile.pool
    if pool.cache_info().currsize:
        pool().shutdown(wait=True)
        pool.cache_clear()


def _synchronous_dgrad(layer: nn.Module) -> None:
    """At TP > 1 megatron's column-parallel linears all-reduce the input gradient with ``async_op=True`` (overlapped
    with the weight-gradient GEMM) inside their autograd Function, which Dynamo refuses (measured at TP=2:
    "async_op=True for distributed collectives"). With ``allreduce_dgrad`` off, megatron's own other path runs:
    ``copy_to_tensor_model_parallel_region`` (identity forward, synchronous all-reduce of the gradient) before the
    linear, the same gradients without the overlap (on the CPU there is nothing to overlap with anyway)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    for module in layer.modules():
        if isinstance(module, ColumnParallelLinear) and getattr(module, "allreduce_dgrad", False):
            module.allreduce_dgrad = False


def compile_options(cfg) -> Dict[str, object]:
    """What :func:`apply_compile` does for ``cfg``: per part, whether the core attention stays eager."""
    selective = False
    if getattr(cfg, "recompute", None) is not None and cfg.recompute.granularity == "selective":
        from heptapod_ds.cost.recompute import plan

        selective = set(plan(cfg)["selective"])
    # the local head's core attention splits its packed length groups with host values that change every step
    # (heptapod_ds.model.attention, already torch.compiler.disable there): its layers are compiled around it
    local = getattr(cfg, "head", None) is not None and cfg.head.type == "local"
    parts = {}
    for part in ("backbone", "head"):
        exclude = (bool(selective) and part in selective) or (part == "head" and local)
        # the local head's packed length changes every step: symbolic from the first compile (measured: with
        # automatic dynamic shapes step 2 recompiled every graph of the layer, ~20 s, a second compile)
        parts[part] = {"exclude_core_attention": exclude, "dynamic": part == "head" and local}
    return parts


def apply_compile(model: nn.Module, cfg=None, exclude_core_attention: Iterable[str] = ()) -> int:
    """Compile every Transformer layer of ``model`` (a HeptapodModel or a PipelineStage) in place.

    ``exclude_core_attention``: parts ("backbone", "head") whose layers run their core attention eagerly
    inside the compiled layer (selective recompute adds its parts). Returns the number of layers compiled.
    """
    _megatron_polyfills()
    _compile_workers()
    options = compile_options(cfg) if cfg is not None else {}
    excluded = set(exclude_core_attention) | {p for p, o in options.items() if o["exclude_core_attention"]}
    count = 0
    for part, container in stacks(model).items():
        exclude = part in excluded
        dynamic = options.get(part, {}).get("dynamic", False)
        for layer in _layers(container):
            if exclude:
                _exclude(layer.self_attention.core_attention)
            _synchronous_dgrad(layer)
            # fullgraph where nothing is left out: a graph break would be a silent slow path; the shapes of a
            # stack are otherwise fixed in training (dynamic=False: one static graph per stack)
            _compile_forward(layer, fullgraph=not exclude, dynamic=True if dynamic else False)
            count += 1
    log.info("train.compile: %d Transformer layers compiled per layer%s", count,
             f" (core attention eager in {', '.join(sorted(excluded))})" if excluded else "")
    return count


def is_compiled(layer: nn.Module) -> bool:
    """Whether :func:`apply_compile` compiled this layer (directly or under a recompute wrapper)."""
    current = layer.__dict__.get("forward")
    if isinstance(current, CompiledForward):
        return True
    if isinstance(current, (Recomputed, ChunkRest)):
        return isinstance(current.forward, CompiledForward)
    if isinstance(current, ChunkFirst):
        return isinstance(current.chunk.forwards[0], CompiledForward)
    return False
