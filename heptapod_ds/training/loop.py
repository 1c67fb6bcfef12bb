"""The training loop: DeepSpeed engine + Heptapod model + resumable data, with preemption handling.

One optimizer step = ``train.grad_accum`` micro-batches per data-parallel rank; DeepSpeed averages
gradients over the accumulation and the data-parallel group, so every logged loss is the mean over
the global batch.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from heptapod_ds.config import HeptapodConfig, to_yaml
from heptapod_ds.distributed import parallel_state
from heptapod_ds.monitor import MetricsSink, get_logger

from .data_stream import BatchStream, sample_seeds
from .throughput import ThroughputMeter, memory_gib, peak_tflops

log = get_logger(__name__)


def _mean_over(group, values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        values = values.clone()
        dist.all_reduce(values, group=group)
        values /= dist.get_world_size(group)
    return values


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, cfg: HeptapodConfig):
        self.cfg = cfg
        self.info = parallel_state.get_info()
        self.device = self.info.device

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from heptapod_ds.data import ensure_dataset
        from heptapod_ds.engine import EMA, CheckpointManager, NonFiniteGuard, PreemptionGuard, build_engine
        from heptapod_ds.model import build_model
        from heptapod_ds.model.flops import train_flops_per_image

        cfg = self.cfg
        if self.info.pp_size > 1:
            raise NotImplementedError("parallel.pipeline > 1: the Heptapod model has no pipeline-stage split yet; "
                                      "train with parallel.pipeline=1 (TP and ZeRO-1/2/3 are supported).")
        os.makedirs(cfg.run_dir, exist_ok=True)
        if parallel_state.is_rank0():
            _atomic_write(os.path.join(cfg.run_dir, "config.yaml"), to_yaml(cfg))
            ensure_dataset(cfg)  # builds the digits beton once; the other ranks then reuse it
        parallel_state.barrier()
        self.data_path = ensure_dataset(cfg)

        self.engine, self.optimizer, self.scheduler = build_engine(cfg, lambda: build_model(cfg))
        self.model = self.engine.module
        self.ema = EMA(self.engine, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.ckpt = CheckpointManager(cfg)
        self.preempt = PreemptionGuard()
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite)

        self.step = 0
        position = {"epoch": 0, "micro_step": 0}
        state = self.ckpt.load(self.engine, ema=self.ema)
        if state is not None:
            self.step = int(state["step"])
            position = state["data"]
            log.info("resumed at step %d (epoch %d, micro-step %d)", self.step, position["epoch"],
                     position["micro_step"])
        self.stream = BatchStream(cfg, self.info.dp_rank, self.info.dp_size, **position)

        flops = float(train_flops_per_image(cfg))
        self.meter = ThroughputMeter(flops, cfg.tokenizer.num_tokens, self.info.world_size,
                                     peak_tflops(cfg.logging.peak_tflops))
        self.metrics = MetricsSink(os.path.join(cfg.run_dir, "metrics.jsonl"), enabled=parallel_state.is_rank0(),
                                   wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                                   run_name=os.path.basename(os.path.abspath(cfg.run_dir)),
                                   config=json.loads(json.dumps(_to_dict(cfg))), resume_step=self.step)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: preset=%s head=%s tokens=%s params on this rank=%.2fM, %.3g train GFLOPs/image; "
                 "world=%d (tp=%d dp=%d) zero=%d grad_accum=%d", cfg.preset, cfg.head.type, cfg.token_type,
                 n_params / 1e6, flops / 1e9, self.info.world_size, self.info.tp_size, self.info.dp_size,
                 cfg.parallel.zero_stage, cfg.train.grad_accum)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> Dict[str, float]:
        cfg = self.cfg
        losses = []
        for _ in range(cfg.train.grad_accum):
            tokens, labels, ids, epoch = self.stream.next()
            seeds = sample_seeds(cfg.train.seed, epoch, ids).to(self.device)
            loss, _stats = self.engine(tokens.to(self.device), labels.to(self.device), sample_seeds=seeds)
            losses.append(loss.detach().float())
            self.engine.backward(loss)
            self.engine.step()
            self.meter.add(labels.shape[0] * self.info.dp_size)
        local = torch.stack(losses).mean()
        return {"loss": local}

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg = self.cfg
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (parallel_state.is_rank0() and cfg.logging.progress_bar))
        t_start = time.time()
        exit_code = 0
        last_loss: Optional[float] = None
        while self.step < cfg.train.steps:
            out = self.nonfinite.run_step(self.engine, self.train_step, ema=self.ema)
            if out.skipped:
                log.warning("step %d: non-finite loss, step skipped (%d in a row, %d total)", self.step + 1,
                            self.nonfinite.in_a_row, self.nonfinite.total)
                if self.nonfinite.should_stop:
                    self._save(reason="non-finite")
                    raise FloatingPointError(
                        f"{self.nonfinite.in_a_row} non-finite losses in a row (train.max_nonfinite="
                        f"{cfg.train.max_nonfinite}); saved the last good state at step {self.step}. Lower the "
                        f"learning rate or check the data.")
                continue
            self.step += 1
            if self.ema is not None:
                self.ema.update()
            loss = _mean_over(parallel_state.dp_group(), out.metrics["loss"].to(self.device)).item()
            last_loss = loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.steps:
                self._log(loss)
            if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                self.evaluate(final=False)
            if self.preempt.should_stop():
                log.warning("preemption signal received: saving at step %d and exiting with status %d",
                            self.step, self.preempt.exit_code)
                self._save(reason="preempted")
                exit_code = self.preempt.exit_code
                break
            if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                self._save(reason="periodic")
        bar.close()
        if exit_code == 0:
            if not self.ckpt.has_step(self.step):
                self._save(reason="final")
            summary = self.evaluate(final=True)
            summary.update(steps=self.step, final_loss=last_loss, train_wall_s=time.time() - t_start,
                           nonfinite_skipped=self.nonfinite.total)
            if parallel_state.is_rank0():
                _atomic_write(os.path.join(cfg.run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
                log.info("summary: %s", json.dumps(summary))
        self.metrics.close()
        return exit_code

    def _log(self, loss: float) -> None:
        rec = {"loss": loss, "lr": self.scheduler.get_last_lr()[0] if self.scheduler else self.cfg.optimizer.lr,
               "grad_norm": _grad_norm(self.engine), "nonfinite_skipped": self.nonfinite.total}
        rec.update(self.meter.report())
        rec.update(memory_gib())
        self.metrics.log(self.step, rec)
        log.info("step %d | loss %.4f | lr %.3g | gnorm %s | %.1f img/s", self.step, loss, rec["lr"],
                 f"{rec['grad_norm']:.3f}" if rec["grad_norm"] is not None else "n/a", rec["images_per_s"])

    def _save(self, reason: str) -> None:
        t0 = time.time()
        self.ckpt.save(self.engine, self.step, {"step": self.step, "data": self.stream.position()}, ema=self.ema)
        log.info("saved checkpoint at step %d (%s) in %.1fs", self.step, reason, time.time() - t0)

    # ------------------------------------------------------------------ samples and quality
    def evaluate(self, final: bool) -> Dict[str, float]:
        from .evaluate import sample_and_score

        return sample_and_score(self, final=final)


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None


def _to_dict(cfg):
    from heptapod_ds.config import to_dict
    return to_dict(cfg)
