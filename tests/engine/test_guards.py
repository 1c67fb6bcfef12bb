"""Preemption flag and non-finite accounting in one process (multi-rank paths: test_engine_dist.py)."""
import os
import signal

import pytest
import torch

from heptapod_ds.engine import REQUEUE_EXIT_CODE, NonFiniteGuard, PreemptionGuard


def test_signal_sets_the_stop_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.should_stop() and guard.signal_name == "SIGUSR1"
        assert guard.exit_code == REQUEUE_EXIT_CODE == 75
    assert signal.getsignal(signal.SIGUSR1) is before


def test_nonfinite_counts_in_a_row_and_stops():
    nf = NonFiniteGuard(2)
    assert nf.agree_finite(torch.tensor(1.0)) and not nf.agree_finite(torch.tensor(float("inf")))
    assert not nf.agree_finite(torch.tensor(float("nan")))
    nf.record(False)
    nf.record(True)
    nf.record(False)
    assert not nf.should_stop
    nf.record(False)
    assert nf.should_stop and nf.total_skipped == 3
    assert "2 non-finite losses in a row at step 7" in str(nf.error(7))
    restored = NonFiniteGuard(2)
    restored.load_state_dict(nf.state_dict())
    assert restored.should_stop


def test_nonfinite_needs_a_positive_limit():
    with pytest.raises(ValueError, match="train.max_nonfinite"):
        NonFiniteGuard(0)
