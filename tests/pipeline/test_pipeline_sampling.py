"""Pipelined generation (PP=2) draws the samples of PP=1 for the same weights and seeds: identical tokens
(discrete), within 1e-5 (continuous), for every head, with cuts inside the backbone, inside the head and
before an output-only last stage; so do TP=2 (2 ranks) and TP=2 x PP=2 (4 ranks)."""
import pytest
import torch

from dist_harness import run_ranks
from pipeline_helpers import layout, small_overrides

pytestmark = pytest.mark.slow

CASES = [("discrete", "global", "1,5"), ("discrete", "local", "4,2"), ("discrete", "next", "3,0"),
         ("continuous", "global", "4,2"), ("continuous", "local", "1,5"), ("continuous", "next", "1,2")]
LABELS = torch.tensor([0, 3, 10, 7])
SEEDS = torch.tensor([11, 12, 13, 2**40])


def _cfg(kind, head, extra=()):
    from heptapod_ds.config import load_config

    return load_config(overrides=small_overrides(kind, head) + ["train.global_batch_size=4",
                                                                "train.micro_batch_size=4", *extra],
                       world_size=int(__import__("os").environ.get("WORLD_SIZE", "1")))


@torch.no_grad()
def _reference(rank, world_size, path):
    from heptapod_ds.model import build_model

    layout(1, 1)
    states, samples = {}, {}
    for kind, head, _ in CASES:
        model = build_model(_cfg(kind, head))
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():  # random weights everywhere (the diffusion output starts at zero)
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        states[(kind, head)] = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        samples[(kind, head)] = model.generate(LABELS, SEEDS)
    torch.save(states, path)
    return samples


@torch.no_grad()
def _pipelined(rank, world_size, path):
    from heptapod_ds.model import build_model

    layout(1, 2)
    states = torch.load(path)
    out = {}
    for kind, head, split in CASES:
        stage = build_model(_cfg(kind, head, ["parallel.pipeline=2", f"parallel.pipeline_split={split}"]))
        full = states[(kind, head)]
        own = stage.state_dict()
        assert all(k in full for k, v in own.items() if torch.is_tensor(v))  # the whole model's names
        stage.load_state_dict({k: full.get(k, v) for k, v in own.items()})
        out[(kind, head)] = stage.generate(LABELS, SEEDS)
    return out


@torch.no_grad()
def _tensor_parallel(rank, world_size, path, pipeline):
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.model import build_model
    from heptapod_ds.model.tp_shard import split_full_state_dict

    layout(2, pipeline)
    info = parallel_state.get_info()
    states = torch.load(path)
    out = {}
    for kind, head, split in CASES:
        extra = ["parallel.tensor=2"] + (["parallel.pipeline=2", f"parallel.pipeline_split={split}"]
                                         if pipeline > 1 else [])
        model = build_model(_cfg(kind, head, extra))
        full = states[(kind, head)]
        model.load_state_dict(split_full_state_dict({k: full[k] for k in model.state_dict() if k in full}, model,
                                                    info.tp_rank, info.tp_size))
        out[(kind, head)] = model.generate(LABELS, SEEDS)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pp_sampling") / "weights.pt")
    return path, run_ranks(_reference, 1, args=(path,), timeout=600)[0]


def _assert_same_samples(reference, per_rank, what):
    for kind, head, split in CASES:
        ref = reference[(kind, head)]
        for got in per_rank:  # every rank returns the tokens
            got = got[(kind, head)]
            if kind == "discrete":
                assert torch.equal(got, ref), f"{what} {kind}/{head} split {split}: tokens differ"
            else:
                err = float((got - ref).norm() / ref.norm())
                assert err <= 1e-5, f"{what} {kind}/{head} split {split}: relative difference {err:.2e}"


@pytest.mark.parametrize("pipeline", [1, 2], ids=["tp2", "tp2xpp2"])
def test_tensor_parallel_samples_equal_one_rank(reference, pipeline):
    path, ref = reference
    per_rank = run_ranks(_tensor_parallel, 2 * pipeline, args=(path, pipeline), timeout=600)
    _assert_same_samples(ref, per_rank, f"TP=2 x PP={pipeline}")


def test_pp2_samples_equal_pp1(reference):
    path, reference = reference
    per_rank = run_ranks(_pipelined, 2, args=(path,), timeout=600)
    _assert_same_samples(reference, per_rank, "PP=2")
    for kind, head, _ in CASES:
        assert reference[(kind, head)].float().std() > 0  # the samples are not trivially constant
