"""A distributed FID sampling run (the engine behind tools/sample_fid.py).

Steps, each on every rank unless noted:

1. Check every input before sampling: the source (release / training checkpoint, EMA by default),
   the tokenizer weights, the reference statistics, the extractor, N >= number of classes, and
   that ``--out`` holds no run with other settings (rank 0 writes ``run.json``).
2. Rank 0 checks the finished shards (``shards.py``) and broadcasts the list still to draw; the
   pending shards go round-robin to the ranks. Image i gets label ``i % C`` and seed
   ``image_seeds(seed, i)``, and every shard is cut into the same batches on any rank count, so
   the images do not depend on the number of ranks.
3. Each rank samples its shards (KV cache, batched), decodes them through the tokenizer, quantises
   to uint8 as MAR/ADM do (``round(clip(255 x))``), extracts Inception features and writes the shard.
4. Each rank adds the features of the shards ``k % world == rank`` as float64 sums; one all-reduce
   gives the statistics (and the Inception Score sums); rank 0 writes ``samples.npz``, ``grid.png``,
   ``samples_stats.npz`` and ``result.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from heptapod_ds.monitor import get_logger

from . import shards as sh
from .labels import class_balanced_labels
from .seeds import image_seeds

log = get_logger(__name__)

GRID_ROWS, GRID_COLS = 8, 8


@dataclass
class FidSettings:
    ckpt: str
    num_samples: int
    out: str
    ref_stats: Optional[str] = None
    inception: str = "bundled"          # bundled | FILE | none
    seed: int = 0
    batch_size: int = 32
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    num_steps: Optional[int] = None
    weights: str = "ema"
    shard_size: int = 1000
    tokenizer_ckpt: Optional[str] = None
    use_kv_cache: bool = True
    digits_metrics: str = "auto"        # auto | on | off
    inception_batch_size: int = 50
    progress: bool = True


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Decoded float images [B, C, H, W] in [0, 1] -> uint8 [B, H, W, 3] (grey repeated to RGB)."""
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"decoded images have {x.shape[1]} channels; expected 1 or 3.")
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _fingerprint(s: FidSettings, source, cfg) -> Dict:
    sampler = {"temperature": s.temperature, "top_k": s.top_k, "num_steps": s.num_steps}
    return {"source": source.identity, "weights": source.weights, "num_samples": s.num_samples, "seed": s.seed,
            "batch_size": s.batch_size, "shard_size": s.shard_size, "num_classes": cfg.backbone.num_classes,
            "sampler": sampler, "use_kv_cache": s.use_kv_cache, "tokenizer": cfg.tokenizer.name,
            "seed_rule": "heptapod_ds.sampling.image_seeds/splitmix64-v1"}


def _broadcast(obj, src: int = 0):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _agree_on_error(err: Optional[BaseException]) -> None:
    """Raise on every rank when any rank failed a check (so no rank starts sampling alone)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        msgs = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}")
        bad = [(r, m) for r, m in enumerate(msgs) if m]
        if bad and err is None:
            raise ValueError(f"rank {bad[0][0]} failed: {bad[0][1]}")
    if err is not None:
        raise err


class FidRun:
    def __init__(self, settings: FidSettings):
        self.s = settings

    # ------------------------------------------------------------------ checks (before any sampling)
    def prepare(self) -> None:
        from heptapod_ds.distributed import parallel_state
        from heptapod_ds.evaluation import load_ref_stats
        from heptapod_ds.evaluation.extractors import build_extractor

        from .source import check_tokenizer_weights, load_sampling_source

        s = self.s
        self.info = parallel_state.get_info()
        err = None
        try:
            if s.num_samples < 1 or s.batch_size < 1 or s.shard_size < 1:
                raise ValueError("--num-samples, --batch-size and --shard-size must be >= 1.")
            self.source = load_sampling_source(s.ckpt, s.weights)
            self.cfg = self.source.cfg
            check_tokenizer_weights(self.cfg, s.tokenizer_ckpt)
            self.num_classes = self.cfg.backbone.num_classes
            class_balanced_labels(s.num_samples, self.num_classes, 0, 0)   # N >= classes
            self.extractor = None if s.inception == "none" else build_extractor(
                s.inception, device=self.info.device, batch_size=s.inception_batch_size)
            self.ref = None
            if s.ref_stats:
                if self.extractor is None:
                    raise ValueError("--ref-stats needs a feature extractor; drop --inception none.")
                self.ref = load_ref_stats(s.ref_stats, expected_dim=self.extractor.dim)
            if self.extractor is not None and self.extractor.has_logits and s.num_samples < 10:
                raise ValueError("the Inception Score uses 10 splits: ask for at least 10 samples.")
            self.fingerprint = _fingerprint(s, self.source, self.cfg)
            self.fp_hash = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()
            if self.info.rank == 0:
                self._claim_out_dir()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank by _agree_on_error
            err = e
        _agree_on_error(err)
        from heptapod_ds.tokenizers import build_tokenizer
        from .source import build_sampling_model

        self.tokenizer = build_tokenizer(self.cfg.tokenizer)
        self.model = build_sampling_model(self.source, device=self.info.device)
        self.source.state = {}  # the model holds the weights now

    def _claim_out_dir(self) -> None:
        s = self.s
        os.makedirs(os.path.join(s.out, sh.SHARD_DIR), exist_ok=True)
        run_file = os.path.join(s.out, "run.json")
        if os.path.isfile(run_file):
            with open(run_file) as f:
                old = json.load(f).get("fingerprint")
            if old != self.fingerprint:
                diff = sorted(k for k in set(old or {}) | set(self.fingerprint)
                              if (old or {}).get(k) != self.fingerprint.get(k))
                raise ValueError(f"--out {s.out} holds a run with other settings ({', '.join(diff)} differ); "
                                 f"resume with the same settings or choose another --out.")
        sh.write_json(run_file, {"fingerprint": self.fingerprint, "fingerprint_sha256": self.fp_hash})

    # ------------------------------------------------------------------ sampling
    def _pending(self) -> List[int]:
        s = self.s
        pending = []
        if self.info.rank == 0:
            sh.clean_temporaries(s.out)
            for k, (a, b) in enumerate(self.ranges):
                data, why = sh.read_shard(sh.shard_path(s.out, k), self.fp_hash, a, b)
                if data is None:
                    if why != "missing":
                        log.warning("shard %d (%s) %s: drawing it again", k, sh.shard_path(s.out, k), why)
                        os.remove(sh.shard_path(s.out, k))
                    pending.append(k)
            log.info("%d of %d shards already done, %d to draw", len(self.ranges) - len(pending), len(self.ranges),
                     len(pending))
        return _broadcast(pending)

    def _features(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        if self.extractor is None:
            return {}
        pool, logits = self.extractor(images)
        out = {"pool": pool.numpy(), "extractor": np.array(self.extractor.name)}
        if logits is not None:
            out["logits"] = logits.numpy()
        return out

    @torch.no_grad()
    def _draw_shard(self, k: int, bar) -> None:
        s = self.s
        a, b = self.ranges[k]
        labels = class_balanced_labels(s.num_samples, self.num_classes, a, b)
        seeds = image_seeds(s.seed, range(a, b))
        chunks = []
        for i in range(0, b - a, s.batch_size):
            j = min(i + s.batch_size, b - a)
            tokens = self.model.generate(labels[i:j].to(self.info.device), seeds[i:j], temperature=s.temperature,
                                         top_k=s.top_k, num_steps=s.num_steps, use_kv_cache=s.use_kv_cache)
            chunks.append(to_uint8_hwc(self.tokenizer.decode(tokens.cpu())))
            if bar is not None:
                bar.update(j - i)
        images = np.concatenate(chunks)
        data = {"images": images, "indices": np.arange(a, b, dtype=np.int64), "labels": labels.numpy(),
                "fingerprint": np.array(self.fp_hash)}
        data.update(self._features(images))
        sh.write_shard(sh.shard_path(s.out, k), data)

    def sample(self) -> float:
        from heptapod_ds.distributed import parallel_state

        s = self.s
        self.ranges = sh.shard_ranges(s.num_samples, s.shard_size)
        pending = self._pending()
        mine = pending[self.info.rank::self.info.world_size]
        count = sum(self.ranges[k][1] - self.ranges[k][0] for k in mine)
        bar = None
        if s.progress and self.info.rank == 0 and count:
            from tqdm import tqdm

            bar = tqdm(total=count, unit="img", desc=f"sampling (rank 0 of {self.info.world_size})",
                       dynamic_ncols=True)
        t0 = time.time()
        for k in mine:
            self._draw_shard(k, bar)
        elapsed = time.time() - t0
        if bar is not None:
            bar.close()
        log.info("rank %d drew %d images in %.1fs", self.info.rank, count, elapsed)
        parallel_state.barrier()
        self.sample_stats = {"images_drawn_this_run_rank0": count, "seconds_rank0": round(elapsed, 3)}
        return elapsed

    # ------------------------------------------------------------------ scoring and outputs
    def _shard(self, k: int) -> Dict[str, np.ndarray]:
        a, b = self.ranges[k]
        name = self.extractor.name if self.extractor is not None else None
        data, why = sh.read_shard(sh.shard_path(self.s.out, k), self.fp_hash, a, b, features=name)
        if data is None:
            raise RuntimeError(f"shard {k} is {why} after sampling; rerun to draw it again.")
        if self.extractor is not None and "pool" not in data:  # drawn earlier without this extractor
            data.update(self._features(data["images"]))
            sh.write_shard(sh.shard_path(self.s.out, k), data)
        return data

    def score(self) -> Dict:
        from heptapod_ds.evaluation import FeatureStats, InceptionScoreStats, frechet_distance_from_stats
        from heptapod_ds.evaluation import save_ref_stats

        s, info = self.s, self.info
        result: Dict = {}
        stats = FeatureStats(self.extractor.dim) if self.extractor is not None else None
        isc = None
        if self.extractor is not None and self.extractor.has_logits:
            isc = InceptionScoreStats(self.extractor.num_logits, s.num_samples)
        for k in range(info.rank, len(self.ranges), info.world_size):
            data = self._shard(k)
            if stats is not None:
                stats.add(data["pool"])
            if isc is not None:
                isc.add(data["logits"], data["indices"])
        if stats is not None:
            stats.all_reduce()
            self.feature_stats = stats
        if isc is not None:
            isc.all_reduce()
        if info.rank != 0:
            return result
        if stats is not None:
            mu, sigma = stats.mean_cov()
            save_ref_stats(os.path.join(s.out, "samples_stats.npz"), mu, sigma,
                           {"extractor": self.extractor.name, "count": stats.count, "source": s.ckpt})
            result["extractor"] = self.extractor.name
            if self.ref is not None:
                result["fid"] = frechet_distance_from_stats(mu, sigma, self.ref[0], self.ref[1])
                result["ref_stats"] = os.path.abspath(s.ref_stats)
        if isc is not None:
            result["inception_score"], result["inception_score_std"] = isc.score()
        return result

    def write_outputs(self, result: Dict) -> Dict:
        s = self.s
        if self.info.rank != 0:
            return result
        first = self._shard(0)["images"]
        shape = first.shape[1:]
        t0 = time.time()
        sh.write_samples_npz(os.path.join(s.out, "samples.npz"),
                             (self._shard(k)["images"] for k in range(len(self.ranges))), s.num_samples, shape)
        log.info("wrote %s (%d images, %.1fs)", os.path.join(s.out, "samples.npz"), s.num_samples, time.time() - t0)
        self._grid()
        digits = self._digits_metrics(shape)
        if digits:
            result["digits"] = digits
        settings = asdict(s)
        settings.pop("progress", None)
        result.update({"num_samples": s.num_samples, "image_shape": list(shape), "settings": settings,
                       "source": {"kind": self.source.kind, "path": self.source.path, "weights": self.source.weights,
                                  "step": self.source.step},
                       "sampler": {"temperature": s.temperature, "top_k": s.top_k, "num_steps": s.num_steps,
                                   "defaults_from_config": {"diffusion": {"temperature": self.cfg.diffusion.temperature,
                                                                          "sample_steps": self.cfg.diffusion.sample_steps},
                                                            "sampling": {"temperature": self.cfg.sampling.temperature,
                                                                         "top_k": self.cfg.sampling.top_k}}},
                       "world_size": self.info.world_size, "timing": self.sample_stats})
        sh.write_json(os.path.join(s.out, "result.json"), result)
        return result

    def _grid(self) -> None:
        from heptapod_ds.evaluation import save_class_grid

        s, c = self.s, self.num_classes
        rows = min(c, GRID_ROWS)
        cols = min(GRID_COLS, (s.num_samples - rows) // c + 1)
        want = [col * c + r for r in range(rows) for col in range(cols)]  # row = class, column = k-th image
        by_shard: Dict[int, List[int]] = {}
        for i in want:
            by_shard.setdefault(i // s.shard_size, []).append(i)
        picked = {}
        for k, idx in by_shard.items():
            imgs = self._shard(k)["images"]
            for i in idx:
                picked[i] = imgs[i - k * s.shard_size]
        grid = np.stack([picked[i] for i in want]).transpose(0, 3, 1, 2).astype(np.float32) / 255
        upscale = max(1, 64 // grid.shape[-1])
        save_class_grid(grid, os.path.join(s.out, "grid.png"), nrow=cols, upscale=upscale)

    def _digits_metrics(self, shape) -> Dict:
        s = self.s
        on_digits = self.cfg.data.path == "digits" and tuple(shape[:2]) == (8, 8)
        if s.digits_metrics == "off" or (s.digits_metrics == "auto" and not on_digits):
            return {}
        if not on_digits:
            raise ValueError("--digits-metrics on needs a model of the embedded 8x8 digits.")
        from heptapod_ds.evaluation import DigitsJudge

        imgs = np.concatenate([self._shard(k)["images"] for k in range(len(self.ranges))])
        labels = np.concatenate([self._shard(k)["labels"] for k in range(len(self.ranges))])
        judge = DigitsJudge(seed=0)
        score = judge.score(imgs[..., 0].astype(np.float64)[:, None] / 255.0, labels)
        ref = judge.reference()
        return {"class_consistency": score.class_consistency, "frechet_distance": score.frechet_distance,
                "reference_class_consistency": ref.class_consistency,
                "reference_frechet_distance": ref.frechet_distance}


def run(settings: FidSettings) -> Dict:
    """Check, sample (resuming finished shards), score and write; returns result.json's content."""
    fr = FidRun(settings)
    fr.prepare()
    fr.sample()
    result = fr.score()
    return fr.write_outputs(result)
