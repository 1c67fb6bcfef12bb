"""A distributed FID sampling run (the engine behind tools/sample_fid.py).

Steps, each on every rank unless noted:

1. Check every input before sampling: the source (release / training checkpoint, EMA by default),
   the tokenizer weights, the reference statistics, the extractor, N >= number of classes, and
   that ``--out`` holds no run with other settings (rank 0 writes ``run.json``).
2. Rank 0 checks the finished shards (``shards.py``) and broadcasts the list still to draw; the
   pending shards go round-robin to the ranks. Image i gets label ``i % C`` and seed
   ``image_seeds(seed, i)``, and every shard is cut into the same batches on any rank count, so
   the images do not depend on the number of ranks.
3. Each rank samples its shards (KV cache, batched; on a GPU bf16 weights and TF32, the DDPM chain in
   fp32), decodes them through the tokenizer on its device, quantises to uint8 as MAR/ADM do
   (``round(clip(255 x))``), extracts Inception pool and spatial features (and logits) and writes the shard.
4. Each rank adds the features of the shards ``k % world == rank`` as float64 sums; all-reduces give
   the pool and spatial statistics (FID, sFID) and the Inception Score sums; the pool features of the
   first ``pr_samples`` images are gathered to rank 0, which computes precision and recall against the
   reference images' features (computed once, on all ranks, cached in ``DIR/ref_features.npz``); rank 0
   writes ``samples.npz``, ``grid.png``, ``samples_stats.npz`` and ``result.json``.

The five numbers follow OpenAI's ADM evaluator (``evaluations/evaluator.py`` of guided-diffusion); what a
reference file cannot give (MAR's stats-only file: sFID, precision, recall) is reported absent with the
reason. ``metrics="auto"`` computes what the inputs allow; a named list makes each one required.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from heptapod_ds.monitor import get_logger

from . import shards as sh
from .labels import class_balanced_labels
from .seeds import image_seeds

log = get_logger(__name__)

GRID_ROWS, GRID_COLS = 8, 8
METRICS = ("fid", "sfid", "is", "pr")                  # names of --metrics
PAPER_ORDER = ("fid", "sfid", "inception_score", "precision", "recall")


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
    metrics: str = "auto"               # auto | comma list of fid, sfid, is, pr
    pr_samples: Optional[int] = None    # precision/recall over the first N samples (None: all)
    pr_k: int = 3                       # neighbourhood size of the manifold estimate (ADM: 3)
    precision: str = "auto"             # sampler weights: auto (bf16 on a GPU, fp32 on CPU) | bf16 | fp32


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Decoded float images [B, C, H, W] in [0, 1] -> uint8 [B, H, W, 3] (grey repeated to RGB)."""
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"decoded images have {x.shape[1]} channels; expected 1 or 3.")
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # quantised on the device: uint8 crosses


def parse_metrics(spec: str) -> Optional[List[str]]:
    """None for ``auto``; otherwise the named metrics (each then required)."""
    if spec == "auto":
        return None
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"--metrics {spec!r}: choose 'auto' or a comma list of {', '.join(METRICS)} "
                         f"(pr = precision and recall).")
    return names


def plan_metrics(s: "FidSettings", extractor, ref) -> Tuple[Dict[str, bool], Dict[str, str]]:
    """Which metrics this run computes, and why each other one is absent; errors for impossible requests.

    Bad inputs stop here, before sampling: a named metric the inputs cannot give, a reference with fewer
    than k + 1 images, fewer than k + 1 samples for precision/recall."""
    asked = parse_metrics(s.metrics)
    why: Dict[str, Optional[str]] = {}
    no_ext = "--inception none: no features"
    no_ref = "no --ref-stats given"
    why["fid"] = no_ext if extractor is None else (no_ref if ref is None else None)
    why["sfid"] = why["fid"] or ref.missing("sfid")
    why["is"] = no_ext if extractor is None else (
        None if extractor.has_logits else "the bundled extractor has no classifier (logits); pass --inception "
                                          "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's file)")
    why["pr"] = why["fid"] or (None if ref.num_images else ref.missing("precision_recall", s.pr_k))
    if asked is not None:
        for m in asked:
            if why[m]:
                raise ValueError(f"--metrics {m} cannot be computed: {why[m]}.")
    plan = {m: (why[m] is None and (asked is None or m in asked)) for m in METRICS}
    if plan["pr"]:
        if s.pr_k < 1:
            raise ValueError(f"--pr-k {s.pr_k} must be >= 1.")
        if s.pr_samples is not None and s.pr_samples < 1:
            raise ValueError(f"--pr-samples {s.pr_samples} must be >= 1.")
        reason = ref.missing("precision_recall", s.pr_k)
        if reason:
            raise ValueError(f"precision/recall: {reason}.")
        n = min(s.num_samples, s.pr_samples or s.num_samples)
        if n < s.pr_k + 1:
            raise ValueError(f"precision/recall with k={s.pr_k} need at least {s.pr_k + 1} samples, this run "
                             f"gives {n} (--num-samples / --pr-samples); or leave pr out of --metrics.")
    absent = {}
    for m in METRICS:
        if not plan[m]:
            absent[m] = why[m] or "not asked for (--metrics)"
    return plan, absent


def _fingerprint(s: FidSettings, source, cfg, precision: str = "fp32") -> Dict:
    sampler = {"temperature": s.temperature, "top_k": s.top_k, "num_steps": s.num_steps}
    fp = {"source": source.identity, "weights": source.weights, "num_samples": s.num_samples, "seed": s.seed,
          "batch_size": s.batch_size, "shard_size": s.shard_size, "num_classes": cfg.backbone.num_classes,
          "sampler": sampler, "use_kv_cache": s.use_kv_cache, "tokenizer": cfg.tokenizer.name,
          "seed_rule": "heptapod_ds.sampling.image_seeds/splitmix64-v1"}
    if precision != "fp32":  # fp32 runs keep the fingerprint (and the resumable shards) of earlier versions
        fp["precision"] = precision
    return fp


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

        from heptapod_ds.evaluation.reference import load_reference

        from .source import check_tokenizer_weights, load_sampling_source, sampler_precision

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
                load_ref_stats(s.ref_stats, expected_dim=self.extractor.dim)  # its messages for mu/sigma
                self.ref = load_reference(s.ref_stats, expected_dim=self.extractor.dim)
            self.plan, self.absent = plan_metrics(s, self.extractor, self.ref)
            if self.plan["is"] and s.num_samples < 10:
                raise ValueError("the Inception Score uses 10 splits: ask for at least 10 samples.")
            self.precision = sampler_precision(self.info.device, s.precision)
            self.fingerprint = _fingerprint(s, self.source, self.cfg, self.precision)
            self.fp_hash = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()
            if self.info.rank == 0:
                self._claim_out_dir()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank by _agree_on_error
            err = e
        _agree_on_error(err)
        from heptapod_ds.tokenizers import build_tokenizer
        from .source import build_sampling_model

        self.tokenizer = build_tokenizer(self.cfg.tokenizer).to(self.info.device)  # decodes on the device
        self.model = build_sampling_model(self.source, device=self.info.device, precision=self.precision)
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
        feats = self.extractor.features(images, spatial=True)
        out = {"pool": feats["pool"].numpy(), "spatial": feats["spatial"].numpy(),
               "extractor": np.array(self.extractor.name)}
        if "logits" in feats:
            out["logits"] = feats["logits"].numpy()
        return out

    @torch.no_grad()
    def _draw_shard(self, k: int, bar) -> None:
        from .source import sampler_math

        s = self.s
        a, b = self.ranges[k]
        labels = class_balanced_labels(s.num_samples, self.num_classes, a, b)
        seeds = image_seeds(s.seed, range(a, b))
        chunks = []
        for i in range(0, b - a, s.batch_size):
            j = min(i + s.batch_size, b - a)
            with sampler_math(self.info.device):
                tokens = self.model.generate(labels[i:j].to(self.info.device), seeds[i:j],
                                             temperature=s.temperature, top_k=s.top_k, num_steps=s.num_steps,
                                             use_kv_cache=s.use_kv_cache)
                chunks.append(to_uint8_hwc(self.tokenizer.decode(tokens)))
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
        if self.extractor is not None and ("pool" not in data or "spatial" not in data):
            # drawn earlier without this extractor (or before spatial features were kept)
            data.update(self._features(data["images"]))
            sh.write_shard(sh.shard_path(self.s.out, k), data)
        return data

    def score(self) -> Dict:
        """FID, sFID, Inception Score, precision and recall (what the plan holds); rank 0 returns them."""
        from heptapod_ds.evaluation import FeatureStats, InceptionScoreStats, frechet_distance_from_stats
        from heptapod_ds.evaluation import save_ref_stats
        from heptapod_ds.evaluation.collectives import gather_rows

        s, info, plan = self.s, self.info, self.plan
        result: Dict = {}
        timing: Dict[str, float] = {}
        stats = FeatureStats(self.extractor.dim) if self.extractor is not None else None
        sstats = FeatureStats(self.extractor.spatial_dim) if plan["sfid"] else None
        isc = InceptionScoreStats(self.extractor.num_logits, s.num_samples) if plan["is"] else None
        pr_n = min(s.num_samples, s.pr_samples or s.num_samples)
        pr_pool, pr_idx = [], []
        t_spatial = 0.0
        for k in range(info.rank, len(self.ranges), info.world_size):
            data = self._shard(k)
            if stats is not None:
                stats.add(data["pool"])
            if sstats is not None:
                t0 = time.time()
                sstats.add(data["spatial"])
                t_spatial += time.time() - t0
            if isc is not None:
                isc.add(data["logits"], data["indices"])
            if plan["pr"]:
                keep = data["indices"] < pr_n
                pr_pool.append(data["pool"][keep])
                pr_idx.append(data["indices"][keep])
        if stats is not None:
            stats.all_reduce()
            self.feature_stats = stats
        if sstats is not None:
            t0 = time.time()
            sstats.all_reduce()
            timing["sfid_stats_s"] = round(t_spatial + time.time() - t0, 3)
        if isc is not None:
            isc.all_reduce()
        pr = None
        if plan["pr"]:
            pr = self._precision_recall(pr_pool, pr_idx, pr_n, gather_rows, timing)
        if info.rank != 0:
            return result
        if stats is not None:
            mu, sigma = stats.mean_cov()
            extra = {}
            if sstats is not None:
                extra["mu_s"], extra["sigma_s"] = sstats.mean_cov()
            save_ref_stats(os.path.join(s.out, "samples_stats.npz"), mu, sigma,
                           {"extractor": self.extractor.name, "count": stats.count, "source": s.ckpt}, **extra)
            result["extractor"] = self.extractor.name
            if self.ref is not None:
                result["ref_stats"] = os.path.abspath(s.ref_stats)
            if plan["fid"]:
                result["fid"] = frechet_distance_from_stats(mu, sigma, self.ref.mu, self.ref.sigma)
            if sstats is not None:
                t0 = time.time()
                result["sfid"] = frechet_distance_from_stats(extra["mu_s"], extra["sigma_s"], self.ref.mu_s,
                                                             self.ref.sigma_s)
                timing["sfid_stats_s"] = round(timing["sfid_stats_s"] + time.time() - t0, 3)
        if isc is not None:
            result["inception_score"], result["inception_score_std"] = isc.score()
        if pr is not None:
            result["precision"], result["recall"] = pr.precision, pr.recall
        absent = {}
        for m, keys in (("fid", ("fid",)), ("sfid", ("sfid",)), ("is", ("inception_score",)),
                        ("pr", ("precision", "recall"))):
            if not plan[m]:
                for key in keys:
                    result[key] = None
                    absent[key] = self.absent[m]
        result["metrics"] = {
            "order": list(PAPER_ORDER), "absent": absent, "definitions": "OpenAI ADM evaluator "
            "(guided-diffusion evaluations/evaluator.py)",
            "num_samples": s.num_samples, "reference": self.ref.path if self.ref is not None else None,
            "extractor": self.extractor.name if self.extractor is not None else None,
            "spatial_features": "mixed_6/conv[..., :7], NHWC, 2023 values" if plan["sfid"] else None,
            "precision_recall": None if pr is None else {
                "k": pr.k, "num_samples": pr.num_samples, "num_reference": pr.num_reference,
                "samples": f"images 0..{pr.num_samples - 1}", "distance": "squared euclidean of pool features, "
                "float64, blocks of 10000 x 10000"},
            "inception_score_splits": 10 if plan["is"] else None, "timing": timing}
        return result

    def _precision_recall(self, pools, indices, pr_n, gather_rows, timing):
        """Gather the first ``pr_n`` samples' pool features to rank 0 and score them there."""
        from heptapod_ds.evaluation.precision_recall import precision_recall
        from heptapod_ds.evaluation.reference import reference_pool_features

        s = self.s
        t0 = time.time()
        ref_pool = reference_pool_features(self.ref, self.extractor, os.path.join(s.out, "ref_features.npz"),
                                           batch_size=s.inception_batch_size)
        timing["ref_features_s"] = round(time.time() - t0, 3)
        t0 = time.time()
        pool = torch.from_numpy(np.concatenate(pools)) if pools else torch.zeros(0, self.extractor.dim)
        idx = torch.from_numpy(np.concatenate(indices)) if indices else torch.zeros(0, dtype=torch.long)
        pool, idx = gather_rows(pool), gather_rows(idx.long())
        if self.info.rank != 0:
            return None
        order = torch.argsort(idx)
        if not torch.equal(idx[order], torch.arange(pr_n)):
            raise RuntimeError(f"precision/recall: gathered {idx.numel()} sample features, expected images 0..{pr_n - 1}.")
        pr = precision_recall(ref_pool, pool[order], k=s.pr_k, device=self.extractor.device)
        timing["precision_recall_s"] = round(time.time() - t0, 3)
        return pr

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
