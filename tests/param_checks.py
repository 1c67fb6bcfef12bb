"""Comparing trained parameters of two layouts that differ only in summation order."""
import torch


def assert_params_close(got, ref, what: str = "parameters", bound: float = 1e-5) -> None:
    """All parameters within ``bound`` relative (as one vector), and every element within ``bound`` absolute.

    Not per tensor relative: the attention key bias has a mathematically zero gradient, so AdamW turns fp32
    round-off (the summation order differs between layouts) into lr-sized steps there, and a per-tensor
    relative bound on ``linear_qkv.bias`` would measure that noise (seen: 5e-5 with every loss equal)."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))[:5]
    flat_got = torch.cat([got[k].flatten() for k in ref])
    flat_ref = torch.cat([ref[k].flatten() for k in ref])
    rel = float((flat_got - flat_ref).norm() / flat_ref.norm())
    assert rel < bound, f"{what}: parameters differ by {rel:.2e} (relative, all parameters)"
    for k in ref:
        worst = float((got[k] - ref[k]).abs().max())
        assert worst < bound, f"{what}: {k} max abs difference {worst:.2e}"
