"""Read checkpoint files without running code from them: ``torch.load(weights_only=True)`` only.

Our per-rank files (``heptapod_rank*.pt``) hold tensors and plain python values and need nothing
else. DeepSpeed's own files pickle a few DeepSpeed objects (the loss scaler, the ZeRO stage enum,
the fp32 fragment addresses); exactly those are allowed, by name, in :data:`DEEPSPEED_GLOBALS`.
Anything else in a pickle (``os.system``, an arbitrary class) is refused with
:class:`UnsafeCheckpointError`, which names the file and the object.
"""
from __future__ import annotations

import contextlib
import importlib
import pathlib
import pickle
import re
from typing import Any, Iterator, List

import torch

# "module:qualname" of every non-torch object DeepSpeed 0.19 pickles into its checkpoint files.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.checkpoint.utils:clone_tensors_for_torch_save",
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that would need an object outside the allowlist (it might run code)."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, not a torch file)."""


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None  # not in this DeepSpeed version: nothing to allow
    return obj


def deepspeed_globals() -> List[Any]:
    return [g for g in (_resolve(s) for s in DEEPSPEED_GLOBALS) if g is not None]


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _refused_objects(path: pathlib.Path, error: Exception, allow_deepspeed: bool) -> str:
    """Name the objects the pickle needs beyond the allowlist (read from its opcodes, nothing is run)."""
    allowed = set(DEEPSPEED_GLOBALS) if allow_deepspeed else set()
    allowed = {a.replace(":", ".") for a in allowed}
    try:
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                 if g not in allowed]
    except Exception:  # noqa: BLE001 - fall back to the error text
        found = []
    if not found:
        found = _GLOBAL_RE.findall(str(error))
    return ", ".join(sorted(set(found))) or "an object outside the allowlist"


def load(path, allow_deepspeed: bool = False, map_location: str = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; DeepSpeed's objects allowed when ``allow_deepspeed``.

    Errors name the file: :class:`UnsafeCheckpointError` (and the refused object) for a pickle that
    needs anything else, :class:`CorruptCheckpointError` for a truncated or unreadable file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing.")
    ctx = (torch.serialization.safe_globals(deepspeed_globals()) if allow_deepspeed
           else contextlib.nullcontext())
    try:
        with ctx:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        obj = _refused_objects(path, e, allow_deepspeed)
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle needs {obj}, which is not on the allowlist (tensors, "
            f"plain python "
            f"values{', DeepSpeed: ' + ', '.join(DEEPSPEED_GLOBALS) if allow_deepspeed else ''})."
            f" Loading it could run code; if you trust the file and it comes from a newer DeepSpeed, "
            f"add the object to heptapod_ds.engine.safe_load.DEEPSPEED_GLOBALS.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"cannot read checkpoint file {path} ({path.stat().st_size} bytes): "
                                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                                     f"The file is truncated or not a torch checkpoint; re-save it or use "
                                     f"another checkpoint (convert_ckpt.py verify names bad files).") from None


def load_rank_file(path) -> Any:
    """One of our ``heptapod_rank*.pt`` files (tensors and plain values only)."""
    return load(path, allow_deepspeed=False)


@contextlib.contextmanager
def safe_deepspeed_loads(engine) -> Iterator[None]:
    """Make ``engine.load_checkpoint`` read DeepSpeed's files through :func:`load` (DeepSpeed's own
    checkpoint engine uses ``weights_only=False``). A ZeRO optimizer file saved by an fp32 run (or the
    converter) is found by a bf16 run, which asks for the ``bf16_``-prefixed name, and vice versa."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None or not hasattr(ckpt_engine, "load"):
        yield
        return
    original = ckpt_engine.load

    def _safe(path, map_location=None, *args, **kwargs):
        path = pathlib.Path(path)
        if not path.exists():  # ZeRO optimizer files are "bf16_"-prefixed in bf16 runs only: try the other
            other = path.with_name(path.name[5:] if path.name.startswith("bf16_") else "bf16_" + path.name)
            if other.is_file() and "zero_pp_rank_" in path.name:
                path = other
        return load(path, allow_deepspeed=True)

    ckpt_engine.load = _safe
    try:
        yield
    finally:
        ckpt_engine.load = original
