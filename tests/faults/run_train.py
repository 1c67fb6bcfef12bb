"""heptapod_ds/train.py with two test-only faults the library has no hook for (a subprocess of the harness).

HEPTAPOD_TORN_WRITE=K      the first file DeepSpeed writes into checkpoint K is cut off half-way and
                           the process SIGKILLs itself: a crash *while* DeepSpeed writes.
HEPTAPOD_NAN_AT=S:R:M      the loss of micro batch M of step S (1-based) is NaN on global rank R only.
The library's own fault points (HEPTAPOD_FAULT_POINT, see heptapod_ds/engine/faults.py) work as well.
"""
import io
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def _torn_write(step: int) -> None:
    import torch

    real = torch.save

    def torn(obj, f, *a, **kw):
        name = str(f)
        if f"global_step{step}/" in name and "heptapod_rank" not in name:
            buf = io.BytesIO()
            real(obj, buf, *a, **kw)
            data = buf.getvalue()
            with open(name, "wb") as fh:
                fh.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *a, **kw)

    torch.save = torn


def _nan_at(spec: str) -> None:
    from heptapod_ds.training.loop import Trainer

    step, rank, micro = (int(x) for x in spec.split(":"))
    real = Trainer._loss
    seen = {}

    def poisoned(self, engine, micro_batch):
        loss = real(self, engine, micro_batch)
        key = self.step + 1
        seen[key] = seen.get(key, -1) + 1
        if key == step and seen[key] == micro and self.info.rank == rank:
            return loss * float("nan")
        return loss

    Trainer._loss = poisoned


if __name__ == "__main__":
    if os.environ.get("HEPTAPOD_TORN_WRITE"):
        _torn_write(int(os.environ["HEPTAPOD_TORN_WRITE"]))
    if os.environ.get("HEPTAPOD_NAN_AT"):
        _nan_at(os.environ["HEPTAPOD_NAN_AT"])
    from heptapod_ds.distributed.process_exit import exit_process
    from heptapod_ds.train import main
    exit_process(main(sys.argv[1:]))
