"""Checkpoint files are read with weights_only=True: plain data and DeepSpeed's few objects pass,
anything that could run code is refused with the file and the object named."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from heptapod_ds.engine import safe_load
from heptapod_ds.engine.checkpoint import rng_state, set_rng_state


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "heptapod_rank00000.pt"
    torch.save({"rng": _RunsCode()}, bad)
    with pytest.raises(safe_load.UnsafeCheckpointError) as e:
        safe_load.load_rank_file(bad)
    msg = str(e.value)
    assert str(bad) in msg and ("system" in msg)
    with pytest.raises(safe_load.UnsafeCheckpointError, match="system"):
        safe_load.load(bad, allow_deepspeed=True)


def test_deepspeed_objects_are_allowed_by_name_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    f = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights,
                                         "map": {"w": fragment_address(numel=3, start=0)}}}, f)
    got = safe_load.load(f, allow_deepspeed=True)["optimizer_state_dict"]
    assert got["zero_stage"] == ZeroStageEnum.weights and got["loss_scaler"].cur_scale == 1.0
    with pytest.raises(safe_load.UnsafeCheckpointError, match="LossScaler|ZeroStageEnum|fragment_address"):
        safe_load.load(f, allow_deepspeed=False)  # our own files need none of them


def test_truncated_file_is_named(tmp_path):
    f = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.arange(10000.0)}}, f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(safe_load.CorruptCheckpointError, match="mp_rank_00_model_states.pt"):
        safe_load.load(f, allow_deepspeed=True)


def test_rng_state_round_trips_through_weights_only(single_rank, tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    f = tmp_path / "rng.pt"
    torch.save({"rng": rng_state()}, f)
    expect = (random.random(), np.random.randn(), torch.rand(1).item())
    set_rng_state(safe_load.load_rank_file(f)["rng"])
    assert (random.random(), np.random.randn(), torch.rand(1).item()) == expect


def test_unpickling_error_type_is_kept():
    assert issubclass(safe_load.UnsafeCheckpointError, pickle.UnpicklingError)


def test_deepspeed_loads_go_through_the_allowlist_and_find_the_other_precision_name(tmp_path):
    class _Engine:
        class checkpoint_engine:  # noqa: N801 - mimics DeepSpeed's attribute
            @staticmethod
            def load(path, map_location=None):
                raise AssertionError("DeepSpeed's own (weights_only=False) load must not run")

    plain = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"x": torch.ones(2)}}, plain)
    engine = _Engine()
    with safe_load.safe_deepspeed_loads(engine):
        got = engine.checkpoint_engine.load(str(tmp_path / ("bf16_" + plain.name)), map_location="cpu")
    assert torch.equal(got["optimizer_state_dict"]["x"], torch.ones(2))
    torch.save({"rng": _RunsCode()}, plain)
    with safe_load.safe_deepspeed_loads(engine), pytest.raises(safe_load.UnsafeCheckpointError):
        engine.checkpoint_engine.load(str(plain))
