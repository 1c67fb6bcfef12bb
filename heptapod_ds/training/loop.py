"""The training loop: DeepSpeed engine + Heptapod model + resumable data, with preemption handling.

One optimizer step = ``train.grad_accum`` micro-batches per data-parallel rank; DeepSpeed averages
gradients over the accumulation and the data-parallel group, so every logged loss is the mean over
the global batch. With pipeline parallelism the micro-batches go through Megatron's 1F1B schedule
(every stage reads the same micro-batches; the loss measured on the last stage reaches global rank 0).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional

import torch

from heptapod_ds.config import HeptapodConfig, to_dict, to_yaml
from heptapod_ds.distributed import parallel_state
from heptapod_ds.monitor import MetricsSink, get_logger

from .data_stream import BatchStream, resume_micro_step, sample_seeds
from .throughput import ThroughputMeter, memory_gib, peak_tflops

if TYPE_CHECKING:
    from heptapod_ds.model.draws import Draws

log = get_logger(__name__)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class MicroBatch(NamedTuple):
    """A micro-batch as the step consumes it: data, per-sample seeds and the draws made from them."""
    tokens: torch.Tensor
    labels: torch.Tensor
    seeds: torch.Tensor
    draws: "Draws"

    def pin_memory(self) -> "MicroBatch":
        return MicroBatch(self.tokens.pin_memory(), self.labels.pin_memory(), self.seeds, self.draws.pin_memory())

    def to(self, device) -> "MicroBatch":
        """On ``device`` with non-blocking copies (asynchronous from page-locked memory; no-ops on CPU)."""
        return MicroBatch(self.tokens.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                          self.seeds, self.draws.to(device, non_blocking=True))


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
        from heptapod_ds.cost.flops import train_flops_per_image

        cfg = self.cfg
        os.makedirs(cfg.run_dir, exist_ok=True)
        if parallel_state.is_rank0():  # rank 0 builds the digits beton once; the other ranks then reuse it
            _atomic_write(os.path.join(cfg.run_dir, "config.yaml"), to_yaml(cfg))
            ensure_dataset(cfg)
        parallel_state.barrier()
        if not parallel_state.is_rank0():
            ensure_dataset(cfg)

        self.pipeline = self.info.pp_size > 1
        if self.pipeline and parallel_state.is_rank0():
            from heptapod_ds.pipeline import describe, split_model
            log.info("%s", describe(cfg, split_model(cfg), micro_batches=cfg.train.grad_accum))
        self.engine, _optimizer, _scheduler = build_engine(cfg, lambda: self._initial_model(build_model(cfg)))
        self.model = self.engine.module  # this stage's PipelineStage under pipeline parallelism
        self.ema = EMA(self.engine, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.ckpt = CheckpointManager(cfg)
        self.preempt = PreemptionGuard()
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite)

        self.step = 0
        self.last_loss: Optional[float] = None
        self._eval_pending: List[str] = []  # this step's periodic evaluations not done yet (see _periodic_evaluations)
        position = {"epoch": 0, "micro_step": 0}
        self.wall_s = {"train": 0.0, "eval": 0.0}  # summed over resumed attempts; training excludes evaluation
        state = self.ckpt.load(self.engine, ema=self.ema)
        if state is not None:
            self.step = int(state["step"])
            position = resume_micro_step(state["data"], cfg)
            self.nonfinite.load_state_dict(state["nonfinite"])
            self.wall_s.update(state.get("wall_s", {}))
            self.last_loss = state.get("last_loss")
            pending = state.get("eval_pending")
            if pending and int(pending["step"]) == self.step:
                self._eval_pending = list(pending["which"])
            log.info("resumed at step %d (epoch %d, micro-step %d)", self.step, position["epoch"],
                     position["micro_step"])
        self.stream = BatchStream(cfg, self.info.dp_rank, self.info.dp_size, **position)

        flops = float(train_flops_per_image(cfg))
        self.flops_per_image = flops
        self.meter = ThroughputMeter(flops, cfg.tokenizer.num_tokens, self.info.world_size,
                                     peak_tflops(cfg.logging.peak_tflops))
        self.metrics = MetricsSink(os.path.join(cfg.run_dir, "metrics.jsonl"), enabled=parallel_state.is_rank0(),
                                   wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                                   run_name=os.path.basename(os.path.abspath(cfg.run_dir)),
                                   config=to_dict(cfg), resume_step=self.step)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: preset=%s head=%s tokens=%s params on this rank=%.2fM, %.3g train GFLOPs/image; "
                 "world=%d (tp=%d pp=%d dp=%d) zero=%d grad_accum=%d", cfg.preset, cfg.head.type, cfg.token_type,
                 n_params / 1e6, flops / 1e9, self.info.world_size, self.info.tp_size, self.info.pp_size,
                 self.info.dp_size,
                 cfg.parallel.zero_stage, cfg.train.grad_accum)

    def _initial_model(self, model):
        """The freshly built model, with a release's weights when ``checkpoint.from_release`` is set (before
        DeepSpeed copies them into its fp32 master; a checkpoint resumed afterwards replaces them)."""
        release = self.cfg.checkpoint.from_release
        if release:
            from heptapod_ds.checkpoint.release import load_release_into

            load_release_into(model, release, run_cfg=self.cfg)
            log.info("initial weights from release %s", release)
        return model

    # ------------------------------------------------------------------ one step
    def _micro_batches(self):
        """One optimizer step's micro-batches, prepared on the host: per-sample seeds, the model's random
        draws made from them (:func:`heptapod_ds.model.draws.draw_batch`), token and label values checked,
        and on a GPU everything in page-locked memory, so the step's copies do not wait."""
        from heptapod_ds.model.draws import draw_batch
        from heptapod_ds.model.heptapod import check_batch_values

        cfg, pin = self.cfg, self.device.type == "cuda"
        out = []
        for _ in range(cfg.train.grad_accum):
            tokens, labels, ids, epoch = self.stream.next()
            seeds = sample_seeds(cfg.train.seed, epoch, ids)
            check_batch_values(tokens, labels, cfg.tokenizer.vocab_size if cfg.tokenizer.is_discrete else None,
                               cfg.backbone.num_classes)
            mb = MicroBatch(tokens, labels, seeds, draw_batch(cfg, tokens.shape[0], seeds, training=True))
            out.append(mb.pin_memory() if pin else mb)
        return out

    def _loss(self, model, micro_batch) -> torch.Tensor:
        """The loss (PP = 1, ``model`` is the engine) or this stage's output (PP > 1, the stage module)."""
        from heptapod_ds.engine.faults import fault_point

        fault_point("train.forward", self.step + 1)
        mb = micro_batch.to(self.device)
        out, _stats = model(mb.tokens, mb.labels, draws=mb.draws)
        return out

    def _client_state(self) -> Dict:
        return {"step": self.step, "data": self.stream.position(), "nonfinite": self.nonfinite.state_dict(),
                "wall_s": self._wall(), "last_loss": self.last_loss,
                "eval_pending": {"step": self.step, "which": list(self._eval_pending)} if self._eval_pending else None}

    def _evaluations_due(self) -> List[str]:
        cfg = self.cfg
        due = []
        if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
            due.append("samples")  # the last step is scored by the final evaluation
        if cfg.eval.fid_every and self.step % cfg.eval.fid_every == 0:
            due.append("fid")
        return due

    def _periodic_evaluations(self, due: List[str]) -> None:
        """This step's periodic evaluations, in order. One that a preemption signal cuts short stays pending, with
        those after it, in the checkpoint the stop saves (client state ``eval_pending``); the resumed run does them
        before its next step, so a preempted run logs every evaluation an uninterrupted one does, once."""
        from heptapod_ds.engine.guards import Preempted

        self._eval_pending = list(due)
        try:
            while self._eval_pending:
                if self._eval_pending[0] == "samples":
                    with self.meter.paused():
                        self.evaluate(final=False)
                else:
                    from .evaluate import fid_during_training

                    t_fid = time.time()
                    with self.meter.paused():
                        fid_during_training(self)
                    self._eval_segment += time.time() - t_fid  # evaluation, not training, time
                self._eval_pending.pop(0)
        except Preempted:
            pass  # the caller's check sees the same signal: save (these still pending) and exit for the requeue

    def progress(self) -> Dict[str, float]:
        """How far training has got, in the units curves are drawn against (identical after a resume)."""
        images = self.step * self.cfg.train.global_batch_size
        return {"images_seen": images, "train_flops": images * self.flops_per_image}

    def _wall(self) -> Dict[str, float]:
        """Wall seconds so far, all attempts: training (checkpoints included) and evaluation apart."""
        now = time.time()
        return {"train": self._wall0["train"] + (now - self._t_segment) - self._eval_segment,
                "eval": self._wall0["eval"] + self._eval_segment}

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        from tqdm import tqdm

        from heptapod_ds.engine import train_step
        from heptapod_ds.engine.faults import fault_point

        cfg = self.cfg
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (parallel_state.is_rank0() and cfg.logging.progress_bar))
        self._wall0, self._t_segment, self._eval_segment = dict(self.wall_s), time.time(), 0.0
        exit_code = 0
        first_compiled = bool(cfg.train.compile)  # this process's first step compiles the layers (train.compile)
        self.compile_s: Optional[float] = None
        if self._eval_pending:  # the resumed step's evaluations that a preemption cut short: first, as scheduled
            log.info("step %d: the evaluation(s) %s cut short by the preemption, done now", self.step,
                     ", ".join(self._eval_pending))
            self._periodic_evaluations(list(self._eval_pending))
            if self._eval_pending and self.preempt.should_stop():   # cut short again: save, requeue
                self._save(reason="preempted")
                exit_code = self.preempt.exit_code
        while self.step < cfg.train.steps and exit_code == 0:
            batches = self._micro_batches()
            if first_compiled:
                result = self._first_compiled_step(train_step, batches)
            else:
                result = train_step(self.engine, batches, self._loss, self.nonfinite, ema=self.ema,
                                    pipeline=self.pipeline)
            if result.skipped:
                log.warning("step %d: non-finite loss, step skipped (%d in a row, %d in total)", self.step + 1,
                            self.nonfinite.in_a_row, self.nonfinite.total_skipped)
                if self.nonfinite.should_stop:
                    self._save(reason="non-finite losses; last good state")
                    raise self.nonfinite.error(self.step)
            else:
                self.step += 1
                self.last_loss = result.loss
                if not first_compiled:  # the compiling step's images are not throughput
                    self.meter.add(sum(mb[1].shape[0] for mb in batches) * self.info.dp_size)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}")
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.steps:
                    self._log(result)
                self._periodic_evaluations(self._evaluations_due())
                fault_point("train.step", self.step)
            first_compiled = False
            if self.preempt.should_stop():  # host values over a host (gloo) group: no wait for the GPU
                log.warning("%s received: saving at step %d, exiting with status %d (requeue)",
                            self.preempt.signal_name or "preemption signal", self.step, self.preempt.exit_code)
                self._save(reason="preempted")
                exit_code = self.preempt.exit_code
                break
            if not result.skipped and cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                self._save(reason="periodic")
        bar.close()
        if exit_code == 0:
            exit_code = self._finish()
        self.preempt.close()
        self.metrics.close()
        if cfg.train.compile:
            from heptapod_ds.model.compile import release_compile_workers
            release_compile_workers()  # a compile-worker thread left running would keep the process from exiting
        return exit_code

    def _first_compiled_step(self, train_step, batches):
        """The first step with ``train.compile``: Dynamo and Inductor compile the layers inside it, so its wall
        time (compile + that one step) is logged apart as ``compile_s`` and left out of the throughput."""
        t0 = time.perf_counter()
        with self.meter.paused():
            result = train_step(self.engine, batches, self._loss, self.nonfinite, ema=self.ema,
                                pipeline=self.pipeline)
        self.compile_s = time.perf_counter() - t0
        self._compile_logged, self._compile_step = False, self.step + 1
        log.info("step %d: %.1f s with train.compile (torch.compile of the layers + this step), logged as compile_s "
                 "and left out of the throughput", self.step + 1, self.compile_s)
        return result

    def _finish(self) -> int:
        """After the last step: the final checkpoint, then the final sampling and summary.

        The preemption guard stays armed: a signal during the (long) sampling exits with the requeue
        status, and since the final checkpoint is already saved, the requeued run only samples."""
        from heptapod_ds.engine.guards import Preempted

        cfg = self.cfg
        latest = self.ckpt.latest()
        if latest is None or latest.name != f"global_step{self.step}":
            self._save(reason="final")
        try:
            summary = self.evaluate(final=True) if cfg.sampling.eval_per_class > 0 else {}
        except Preempted as e:
            log.warning("%s: the final checkpoint (step %d) is saved; exiting with status %d so that the requeued "
                        "run only samples and scores", e, self.step, self.preempt.exit_code)
            return self.preempt.exit_code
        wall = self._wall()
        if getattr(self, "compile_s", None) is not None:
            summary["compile_s"] = self.compile_s
        summary.update(steps=self.step, final_loss=self.last_loss, train_wall_s=wall["train"],
                       eval_wall_s=wall["eval"], train_flops_per_image=self.flops_per_image, **self.progress(),
                       nonfinite_skipped=self.nonfinite.total_skipped)
        if parallel_state.is_rank0():
            _atomic_write(os.path.join(cfg.run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
            log.info("summary: %s", json.dumps(summary))
        return 0

    def _log(self, result) -> None:
        grad_norm = result.grad_norm  # read once (a device value)
        grad_norm = grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None
        rec = {"loss": result.loss, "lr": result.lr, "grad_norm": grad_norm,
               "nonfinite_skipped": self.nonfinite.total_skipped}
        rates = self.meter.report()
        if getattr(self, "compile_s", None) is not None and not getattr(self, "_compile_logged", True):
            rec["compile_s"] = self.compile_s  # the first logged step after the compiling one carries its time
            self._compile_logged = True
            if self.step == self._compile_step:  # the window holds the compiling step alone: no throughput in it
                rates = {k: None for k in rates}
        rec.update(rates)
        rec.update(memory_gib())
        if self.device.type == "cuda" and not getattr(self, "_memory_compared", False):
            self._memory_compared = True
            self._compare_memory(rec)
        self.metrics.log(self.step, rec)
        log.info("step %d | loss %.4f | lr %.3g | gnorm %s | %s img/s", self.step, result.loss, rec["lr"],
                 f"{rec['grad_norm']:.3f}" if rec["grad_norm"] is not None else "n/a",
                 f"{rec['images_per_s']:.1f}" if rec["images_per_s"] is not None else "n/a (compile step)")

    def _compare_memory(self, rec: Dict) -> None:
        """After the first logged steps on a GPU: the measured peak beside the planner's prediction."""
        from heptapod_ds.cost.plan import per_rank

        predicted = per_rank(self.cfg)["total_bytes"] / 2**30
        rec["mem_predicted_gib"] = predicted
        log.info("GPU memory after %d steps: peak allocated %.2f GiB, planner predicted %.2f GiB for the most "
                 "loaded rank (%+.0f%%)", self.step, rec["mem_peak_gib"], predicted,
                 100 * (rec["mem_peak_gib"] / predicted - 1) if predicted else 0.0)

    def _save(self, reason: str) -> None:
        t0 = time.time()
        with self.meter.paused():  # checkpoint time is not training throughput
            self.ckpt.save(self.engine, self.step, self._client_state(), ema=self.ema)
        log.info("saved checkpoint at step %d (%s) in %.1fs", self.step, reason, time.time() - t0)

    # ------------------------------------------------------------------ samples and quality
    def evaluate(self, final: bool) -> Dict[str, float]:
        from .evaluate import sample_and_score

        t0 = time.time()
        try:
            return sample_and_score(self, final=final)
        finally:
            if hasattr(self, "_t_segment"):
                self._eval_segment += time.time() - t0
