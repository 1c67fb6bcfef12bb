"""Train Heptapod.

    deepspeed heptapod_ds/train.py --ds_config ds_configs/zero3.json [--config FILE.yaml] [key=value ...]
    torchrun --nproc_per_node 8 heptapod_ds/train.py ...      srun python heptapod_ds/train.py ...
    python heptapod_ds/train.py                                # CPU demo: tiny preset on the digits

The configuration is resolved and validated before any process group exists (``--print-config``
shows it); then the parallel state is built, and :class:`heptapod_ds.training.Trainer` runs. Exit
status: 0 when done, the requeue status after a preemption signal (checkpoint saved), 2 on a
configuration error or an input file that does not fit the config (found before any process group
exists or anything is written), 1 on any other failure (a damaged checkpoint with no intact one to
fall back to, a checkpoint that cannot be written, a rank that died or hangs).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # started as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from heptapod_ds.config.cli import add_config_args, resolve_or_exit  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heptapod_ds/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=None,
                        help="DeepSpeed JSON config (ds_configs/*.json); same as parallel.ds_config=...")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_config_args(parser)
    return parser


def parse_config(argv=None):
    """Parse the command line; a ``--ds_config`` JSON that fixes its ZeRO stage selects that stage,
    before the user's own ``key=value`` overrides (an explicit, different stage is then an error)."""
    args = build_parser().parse_args(argv)
    if args.ds_config:
        from heptapod_ds.config import ConfigError
        from heptapod_ds.engine.ds_config import file_overrides

        try:
            implied = file_overrides(args.ds_config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        args.overrides = [*implied, f"parallel.ds_config={args.ds_config}", *args.overrides]
    return args, resolve_or_exit(args)


def main(argv=None) -> int:
    _args, cfg = parse_config(argv)
    from heptapod_ds.config import ConfigError
    from heptapod_ds.data.format import BetonError
    from heptapod_ds.training.preflight import check_inputs

    try:  # before any process group exists and before anything is written to the run directory
        check_inputs(cfg)
    except (ConfigError, BetonError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.monitor import provenance, setup_logging
    from heptapod_ds.training import Trainer
    from heptapod_ds.distributed.failures import collective_failure
    from heptapod_ds.engine import CheckpointCorrupt, CheckpointMismatch, CheckpointWriteError

    setup_logging()
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        from heptapod_ds.cost.plan import log_startup_plan
        log_startup_plan(cfg)  # memory per rank by part and the predicted step time (heptapod_ds.plan)
    info = parallel_state.initialize(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                                     backend=cfg.parallel.backend, seed=cfg.train.seed,
                                     timeout_minutes=cfg.parallel.collective_timeout_s / 60)
    trainer = None
    try:
        # launches.jsonl (rank 0): git commit, Slurm job and attempt, command line, config, and the outcome
        with provenance.RunRecord(cfg, info, argv) as record:
            trainer = Trainer(cfg)
            record.trainer = trainer  # a failure's exit record names its step and the checkpoint to resume from
            trainer.setup()
            code = trainer.run()
            record.finished(code, trainer.step, signal=trainer.preempt.signal_name)
        # No rank exits before the exit record exists: under `srun --kill-on-bad-exit` the first rank
        # to exit with the requeue status gets the others killed.
        parallel_state.barrier()
        return code
    except (CheckpointCorrupt, CheckpointMismatch, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)  # a message that says what to do; no traceback needed
        return 1
    except Exception as e:  # noqa: BLE001 - a failed collective must end this rank, not hang it
        what = collective_failure(e)
        if what is None:
            raise
        _exit_after_collective_failure(what, trainer, cfg)
    finally:
        parallel_state.destroy()


def _exit_after_collective_failure(what: str, trainer, cfg) -> None:
    """Say which step failed and where to restart from, then leave at once: the process-group tear-down
    would wait for the rank that is gone."""
    import traceback

    from heptapod_ds.distributed import parallel_state

    step = getattr(trainer, "step", None)
    ckpt = getattr(trainer, "ckpt", None)
    newest = ckpt.latest() if ckpt is not None else None
    traceback.print_exc()
    print(f"error: rank {parallel_state.rank()}: a collective operation failed"
          f"{'' if step is None else f' during step {step + 1}'} ({what}). Another rank died or hangs (see its "
          f"log; the wait is bounded by parallel.collective_timeout_s={cfg.parallel.collective_timeout_s}). The "
          f"newest complete checkpoint is {newest or 'none'}; restart the job, checkpoint.resume=auto resumes "
          f"from it.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
    from heptapod_ds.distributed.process_exit import exit_process

    exit_process(main())
