"""HeptapodModel: causal backbone + next-2D-distribution head + per-token output (diffusion or softmax).

``forward`` returns the training loss; ``generate`` samples images token by token in raster order.
Which parts are tensor-parallel: the transformer layers of backbone and head (megatron's column /
row-parallel linears). Everything else - embeddings, position tables, the mask token, the head's input
projection, the diffusion MLP and the classifier - is replicated, and gets identical gradients on TP
peers because its inputs are identical there.

ZeRO-3 rule kept here: every parameter is used only inside the forward of the module that owns it
(this class owns none itself; it only calls submodules).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Dict, Optional, Set, Tuple

import torch
from torch import nn

from heptapod_ds.sampling.seeds import generators

from .backbone import CausalBackbone
from .categorical import CategoricalOutput, sample_logits
from .diffusion import DiffusionLoss
from .draws import Draws, draw_batch
from .heads import GridHead
from .recompute import apply_recompute


class HeptapodModel(nn.Module):
    def __init__(self, cfg, impl: str = "local", tensor_parallel: int = 1):
        super().__init__()
        self.cfg = cfg
        tok, head = cfg.tokenizer, cfg.head
        self.discrete = tok.is_discrete
        self.num_tokens = tok.num_tokens
        self.channels = tok.channels
        self.vocab_size = tok.vocab_size
        self.num_classes = cfg.backbone.num_classes
        self.head_type = head.type
        self.window = head.window if head.type == "local" else None
        self.backbone = CausalBackbone(cfg, impl, tensor_parallel)
        if head.type == "next":
            self.head = None
            cond_dim = cfg.backbone.width
        else:
            self.head = GridHead(cfg, impl, tensor_parallel, window=self.window)
            cond_dim = head.width
        if self.discrete:
            self.output = CategoricalOutput(cond_dim, tok.vocab_size)
        else:
            d = cfg.diffusion
            self.output = DiffusionLoss(tok.channels, cond_dim, d.width, d.depth, d.train_steps, d.batch_mul)
        apply_recompute(self, cfg)  # cfg.recompute: checkpointed layers / output (no-op for none)

    # ------------------------------------------------------------------ training

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, sample_seeds: Optional[torch.Tensor] = None,
                draws: Optional[Draws] = None) -> Tuple[torch.Tensor, "Stats"]:
        """Loss = mean over images of the mean loss of each image's supervised targets.

        Weighting every image equally keeps the loss of a sample independent of its micro-batch, so
        data-parallel averaging over equal micro-batches equals the loss of the whole batch.

        ``draws``: the micro-batch's random draws made ahead on the host (:func:`.draws.draw_batch`) and
        moved to the tokens' device, as the trainer does; without them they are drawn here from
        ``sample_seeds`` (a convenience for tests and tools: it reads the seeds on the host). Nothing in
        here reads a device value on the host.
        """
        self._check_inputs(tokens, labels, sample_seeds, draws)
        if draws is None:
            draws = self.draw_randomness(tokens, labels, sample_seeds)
        o = self.backbone(draws.labels(labels, self.num_classes), tokens[:, :self.num_tokens - 1])  # [B, N, Wb]
        if self.head is None:
            return self.loss_from_features(o.transpose(0, 1), tokens, draws)
        # a drawn plan: t < N; features [N+1, B*T, Wh], or packed [P, 1, Wh] (the local head)
        features = self.head(o, draws.plan.timesteps, draws.packed, bounded=True)
        return self.loss_from_features(features, tokens, draws)

    def draw_randomness(self, tokens: torch.Tensor, labels: torch.Tensor,
                        sample_seeds: Optional[torch.Tensor]) -> Draws:
        """The draws of a batch from its seeds (:func:`.draws.draw_batch`), on the tokens' device.
        Every pipeline stage gets the same draws, so all stages agree on labels, plan and noise without
        communicating."""
        seeds = None if sample_seeds is None else sample_seeds.cpu()
        return draw_batch(self.cfg, tokens.shape[0], seeds, training=self.training).to(tokens.device)

    def loss_from_features(self, features: torch.Tensor, tokens: torch.Tensor,
                           draws: Draws) -> Tuple[torch.Tensor, "Stats"]:
        """The loss from the last features in megatron layout: the backbone's ``[N, B, Wb]`` (next head),
        the head's ``[N + 1, B * T, Wh]`` or its packed ``[P, 1, Wh]`` (the local head, ``draws.packed``).
        Mean over images of each image's mean target loss."""
        plan, batch = draws.plan, tokens.shape[0]
        if self.head is None:
            z = features.transpose(0, 1).reshape(batch * self.num_tokens, -1)
        elif draws.packed is not None:
            z = features.reshape(-1, features.shape[-1])[draws.packed.select]
        else:
            z = features.transpose(0, 1)[plan.rows, plan.slots]
        target = tokens[plan.sample, plan.slots - 1]
        if self.discrete:
            per_target = nn.functional.cross_entropy(self.output(z).float(), target, reduction="none")
        else:
            per_target = self.output(target, z, draws.diffusion_on(tokens.device, self.cfg))
        weight = 1.0 / (plan.counts.to(per_target.dtype)[plan.sample] * batch)
        loss = (per_target * weight).sum()
        return loss, Stats(loss=loss.detach(), supervised_per_image=plan.counts.float().mean())

    def _check_inputs(self, tokens, labels, sample_seeds, draws: Optional[Draws] = None) -> None:
        """Shapes and dtypes always; values only of host tensors (checking a device tensor's values would
        wait for the device: the trainer checks its batches on the host, :func:`check_batch_values`)."""
        n = self.num_tokens
        if self.discrete:
            if tokens.dtype != torch.long or tokens.dim() != 2 or tokens.shape[1] != n:
                raise ValueError(f"discrete tokens must be long [B, {n}], "
                                 f"got {tokens.dtype} {tuple(tokens.shape)}.")
        elif not tokens.is_floating_point() or tokens.dim() != 3 or tokens.shape[1:] != (n, self.channels):
            raise ValueError(f"continuous tokens must be float [B, {n}, {self.channels}] "
                             f"(tokenizer.channels), "
                             f"got {tokens.dtype} {tuple(tokens.shape)}.")
        _check_labels(labels, tokens.shape[0], self.num_classes)
        if draws is None and tokens.device.type == "cpu":  # with draws the caller checked its host batch
            check_batch_values(tokens, labels, self.vocab_size if self.discrete else None, self.num_classes)
        if sample_seeds is not None and (sample_seeds.dim() != 1 or sample_seeds.shape[0] != tokens.shape[0]):
            raise ValueError(f"sample_seeds must be [B={tokens.shape[0]}], got {tuple(sample_seeds.shape)}.")
        if draws is not None:
            if draws.batch != tokens.shape[0]:
                raise ValueError(f"the draws are for {draws.batch} samples, the batch has {tokens.shape[0]}.")
            if draws.training != self.training:
                raise ValueError(f"the draws were made for a model in {'training' if draws.training else 'eval'} "
                                 f"mode (label dropout {'on' if draws.training else 'off'}), this model is in "
                                 f"{'training' if self.training else 'eval'} mode; draw them with "
                                 f"draw_batch(..., training=model.training).")

    def no_weight_decay(self) -> Set[str]:
        """Embeddings, the mask token and position tables (norms/biases are found by ndim <= 1)."""
        names = {"backbone.class_embed.weight", "backbone.token_embed.weight"}
        if not self.discrete:
            names.discard("backbone.token_embed.weight")  # a linear projection of latents: decay it
        for name, _ in self.named_parameters():
            if name.endswith(("pos_embed.row_embed", "pos_embed.col_embed", "mask_token")):
                names.add(name)
        return names

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, seeds: torch.Tensor, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, num_steps: Optional[int] = None,
                 use_kv_cache: bool = True) -> torch.Tensor:
        """Sample ``len(labels)`` images in raster order, one token per step.

        ``seeds`` (long [B]) holds one seed per image: all randomness of image i comes from a generator
        seeded with ``seeds[i]``, so an image does not depend on its batch-mates, the batch size or the
        KV cache (take the seeds from ``heptapod_ds.sampling.image_seeds``).

        Continuous tokens come from the DDPM sampler (``num_steps`` / ``temperature`` default to
        cfg.diffusion), discrete ones from softmax(logits / temperature) with an optional top-k filter
        (defaults cfg.sampling; temperature 0 = argmax). ``use_kv_cache=False`` recomputes the whole prefix
        at every step (the reference the cache is tested against).
        """
        batch = labels.shape[0]
        _check_labels(labels, batch, self.num_classes)
        if labels.device.type == "cpu":
            check_batch_values(None, labels, None, self.num_classes)
        gens = generators(seeds)
        if len(gens) != batch:
            raise ValueError(f"seeds must hold one seed per image: {len(gens)} seeds for {batch} labels.")
        device = labels.device
        temperature, top_k, num_steps = self.sampling_settings(temperature, top_k, num_steps)
        n = self.num_tokens
        tokens = self.empty_tokens(batch, device)
        was_training = self.training
        self.eval()
        prefix = []
        try:
            with device_scope(device):  # megatron allocates the KV cache on the current CUDA device
                cache = _make_cache(batch, n) if use_kv_cache else None
                for t in range(n):
                    if cache is not None:
                        prefix.append(self.backbone(labels, tokens[:, :t], start=t, inference_context=cache))
                        o = torch.cat(prefix, dim=1)                                   # o_0..o_t
                    else:
                        o = self.backbone(labels, tokens[:, :t])
                    if self.head is None:
                        z = o[:, t]
                    else:  # z_{t,t+1}, the head's sequence cut to the slots it reads at t
                        steps = torch.full((batch, 1), t, dtype=torch.long, device=device)
                        z = self.head(o, steps, num_slots=self.head.sampling_length(t))[t + 1]
                    tokens[:, t] = self.sample_token(z, gens, temperature, top_k, num_steps).to(tokens.dtype)
        finally:
            self.train(was_training)
        return tokens

    def sampling_settings(self, temperature: Optional[float], top_k: Optional[int], num_steps: Optional[int]):
        """(temperature, top_k, num_steps) with the config's defaults filled in."""
        if self.discrete:
            temperature = self.cfg.sampling.temperature if temperature is None else temperature
            top_k = self.cfg.sampling.top_k if top_k is None else top_k
        else:
            temperature = self.cfg.diffusion.temperature if temperature is None else temperature
            num_steps = self.cfg.diffusion.sample_steps if num_steps is None else num_steps
        return temperature, top_k, num_steps

    def empty_tokens(self, batch: int, device) -> torch.Tensor:
        shape = (batch, self.num_tokens) if self.discrete else (batch, self.num_tokens, self.channels)
        return torch.zeros(shape, dtype=torch.long if self.discrete else torch.float32, device=device)

    def sample_token(self, z: torch.Tensor, gens, temperature, top_k, num_steps) -> torch.Tensor:
        """One token per row of the condition ``z`` [B, D], row i drawn with ``gens[i]``."""
        if self.discrete:
            return sample_logits(self.output(z), temperature, top_k, gens)
        return self.output.sample(z, num_steps, temperature, gens)


def device_scope(device: torch.device):
    """Make ``device`` the current CUDA device inside the block (megatron allocates on the current one)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class Stats(Mapping):
    """The step's statistics, kept as tensors; a value is read to a float only when someone asks for it,
    so a trainer that does not look at them never waits for the device."""

    def __init__(self, **values):
        self._values = values

    def __getitem__(self, key: str) -> float:
        return float(self._values[key])

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _check_labels(labels: torch.Tensor, batch: int, num_classes: int) -> None:
    if labels.dtype != torch.long or labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must be long [B={batch}], got {labels.dtype} {tuple(labels.shape)}.")


def check_batch_values(tokens: Optional[torch.Tensor], labels: torch.Tensor, vocab_size: Optional[int],
                       num_classes: int) -> None:
    """Token ids in the vocabulary (discrete: pass ``vocab_size``) and labels in [0, num_classes]; reads the
    values, so call it on host tensors (the trainer does, on each batch before its copy to the device)."""
    if tokens is not None and vocab_size is not None and tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}) (tokenizer.vocab_size), "
                             f"got values in [{lo}, {hi}].")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes} = 'no class'), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}].")


def _make_cache(batch: int, length: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=length)
