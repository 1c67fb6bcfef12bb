"""TP=2 on 2 gloo ranks gives the loss and the (gathered) gradients of TP=1, for every head and token type.

The TP=1 reference uses megatron's unfused core attention; TP=2 runs it and SDPA (backbone.attention)."""
import io

import pytest
import torch

from dist_harness import run_ranks
from model_helpers import HEAD_TYPES, TOKEN_KINDS, random_tokens, randomize_zero_params, tiny_cfg

def _to_bytes(obj) -> bytes:
    """Results leave the ranks as bytes: tensors sent through a multiprocessing queue travel as
    shared-memory handles that die with the rank, and the parent then waits forever."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data))


CASES = [(kind, head) for kind in TOKEN_KINDS for head in HEAD_TYPES]
ATTENTIONS = ("megatron", "sdpa")


def _batch(kind, cfg):
    tokens = random_tokens(kind, 4, cfg, torch.Generator().manual_seed(7))
    return tokens, torch.tensor([0, 3, 9, 10]), torch.tensor([21, 22, 23, 24])


def _tp2_body(rank, world_size, states_path):
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.model import build_model
    from heptapod_ds.model.tp_shard import gather_full_grads, gather_full_state_dict, split_full_state_dict

    full_states = torch.load(states_path)
    info = parallel_state.initialize(tensor=2, pipeline=1, seed=0)
    results = {}
    for (kind, head), full_sd in zip(CASES, full_states):
        for attention in ATTENTIONS:
            cfg = tiny_cfg(kind, head, tensor=2, world_size=2, **{"backbone.attention": attention})
            model = build_model(cfg)
            model.load_state_dict(split_full_state_dict(full_sd, model, info.tp_rank, info.tp_size))
            regathered = gather_full_state_dict(model)
            assert all(torch.equal(regathered[k], full_sd[k]) for k in full_sd), "split/gather round trip"
            tokens, labels, seeds = _batch(kind, cfg)
            loss, _ = model(tokens, labels, sample_seeds=seeds)
            loss.backward()
            results[(kind, head, attention)] = (float(loss.detach()), gather_full_grads(model))
    return _to_bytes(results)


def _tp1_body(rank, world_size, states_path):
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.model import build_model
    from heptapod_ds.model.tp_shard import gather_full_state_dict

    parallel_state.initialize(tensor=1, pipeline=1, seed=0)
    full_states, reference = [], {}
    for kind, head in CASES:
        torch.manual_seed(0)
        cfg = tiny_cfg(kind, head, **{"backbone.attention": "megatron"})
        model = build_model(cfg)
        randomize_zero_params(model)
        full_states.append(gather_full_state_dict(model))
        tokens, labels, seeds = _batch(kind, cfg)
        loss, _ = model(tokens, labels, sample_seeds=seeds)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        reference[(kind, head)] = (float(loss.detach()), grads)
    torch.save(full_states, states_path)
    return _to_bytes(reference)


@pytest.mark.slow
def test_tp2_matches_tp1(tmp_path):
    # Both sides run in spawned worlds: the TP=1 reference in a 1-rank world, TP=2 on 2 ranks; the
    # TP=1 weights travel through a file.
    states_path = str(tmp_path / "tp1_states.pt")
    reference = _from_bytes(run_ranks(_tp1_body, world_size=1, args=(states_path,), timeout=120)[0])
    per_rank = [_from_bytes(r) for r in run_ranks(_tp2_body, world_size=2, args=(states_path,), timeout=180)]
    for (kind, head), (ref_loss, ref_grads) in reference.items():
        for rank_results, attention in ((r, a) for r in per_rank for a in ATTENTIONS):
            case = (kind, head, attention)
            loss, grads = rank_results[case]
            assert loss == pytest.approx(ref_loss, rel=1e-5), case
            assert grads.keys() == ref_grads.keys()
            for name, ref in ref_grads.items():
                err = (grads[name] - ref).norm() / ref.norm().clamp_min(1e-12)
                assert err <= 1e-5, f"{case} {name}: relative gradient error {float(err):.2e}"
                assert ref.norm() > 0 or name.endswith("class_embed.weight"), f"{case} {name} has no gradient"
