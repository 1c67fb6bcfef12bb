"""Run heptapod_ds/train.py with an injected fault (used by the training tests as a subprocess).

HEPTAPOD_FAULT=sigterm_after_step:K   SIGTERM to itself once optimizer step K has finished
HEPTAPOD_FAULT=sigkill_in_save:K      SIGKILL to itself in the middle of saving checkpoint K
                                      (after DeepSpeed wrote its files, before the checkpoint is complete)
"""
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def _install(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    k = int(arg)
    if kind == "sigterm_after_step":
        import heptapod_ds.engine as engine_pkg

        original = engine_pkg.train_step
        calls = {"n": 0}

        def counting_step(*a, **kw):
            result = original(*a, **kw)
            calls["n"] += 1
            if calls["n"] == k:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        engine_pkg.train_step = counting_step  # the loop imports it from the package at run time
    elif kind == "sigkill_in_save":
        import torch

        original_save = torch.save

        def killing_save(obj, f, *a, **kw):
            if str(f).endswith(".pt") and f"global_step{k}" in str(f) and "heptapod_rank" in str(f):
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, f, *a, **kw)

        torch.save = killing_save
    else:
        raise SystemExit(f"unknown HEPTAPOD_FAULT {fault!r}")


if __name__ == "__main__":
    if os.environ.get("HEPTAPOD_FAULT"):
        _install(os.environ["HEPTAPOD_FAULT"])
    from heptapod_ds.train import main
    argv = sys.argv[1:]
    if argv and argv[0].endswith("train.py"):  # used as tools/ablate.py --launcher, which names train.py first
        argv = argv[1:]
    sys.exit(main(argv))
