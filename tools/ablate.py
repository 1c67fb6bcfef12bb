#!/usr/bin/env python
"""Run an ablation grid and write its report.

    python tools/ablate.py experiments/heads_digits.yaml                 # every run, one after another
    python tools/ablate.py experiments/heads_digits.yaml --quick         # the grid's short version, first seed
    python tools/ablate.py GRID train.steps=200 eval.every=25            # overrides for every run
    python tools/ablate.py GRID --slurm [--sbatch-arg=--partition=gpu]   # one Slurm array task per run
    python tools/ablate.py GRID --report-only [--report experiments/heads_digits.md]

Every run trains with ``heptapod_ds/train.py`` in ``OUT/<variant>/seed<N>/`` (default OUT:
``runs/ablate/<grid name>``, ``-quick`` appended with --quick). Calling the tool again skips finished
runs (summary.json present) and resumes interrupted ones from their newest checkpoint, so a stopped
grid is continued by repeating the command. Ctrl-C (or SIGTERM) makes the running trainer save a
checkpoint first. The report (markdown table + PNG curves of every score against steps and
training FLOPs) is rewritten after every finished run; text written by hand outside its generated
block is kept. Exit status: 0 when every run finished, 1 when a run failed, 2 on a bad grid or
argument, 75 when stopped by a signal (rerun to resume).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from heptapod_ds.experiments import GridError, load_grid  # noqa: E402
from heptapod_ds.experiments.grid import check_runs  # noqa: E402
from heptapod_ds.experiments.runner import (  # noqa: E402
    DONE, REPO, check_not_stale, default_launcher, run_one, run_state, train_command)

REQUEUE_EXIT = 75


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/ablate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid YAML (variants, seeds, base/quick overrides); see experiments/heads_digits.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides applied to every run")
    p.add_argument("--out", default=None, help="root of the run directories (default runs/ablate/<grid name>)")
    p.add_argument("--quick", action="store_true", help="apply the grid's 'quick' overrides and run its first seed only")
    p.add_argument("--only", default=None, metavar="V1,V2", help="run only these variants (the report shows all)")
    p.add_argument("--seeds", default=None, metavar="S1,S2", help="use only these of the grid's seeds (runs and report)")
    p.add_argument("--list", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from what the runs left, run nothing")
    p.add_argument("--report", default=None, metavar="FILE.md", help="report path (default OUT/report.md); its plots "
                   "go to <FILE stem>_plots/ beside it")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run (default: go on, exit 1)")
    p.add_argument("--launcher", default=None, metavar="CMD", help="command that starts train.py (default: this "
                   "python), e.g. 'torchrun --standalone --nproc_per_node 8'")
    p.add_argument("--world-size", type=int, default=None, help="ranks per run, for checking the configs up front "
                   "(default: tensor x pipeline of each run)")
    p.add_argument("--slurm", action="store_true", help="submit the unfinished runs as a Slurm array, and a report "
                   "job that runs after it")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG", help="extra #SBATCH line for the "
                   "array, e.g. --sbatch-arg=--gpus-per-node=1 (repeatable)")
    p.add_argument("--sbatch", default="sbatch", help="the sbatch command (default: sbatch)")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: write the array script, submit nothing")
    p.add_argument("--task", type=int, default=None, help=argparse.SUPPRESS)  # one array task: run number TASK
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        return _main(args)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _say(msg: str) -> None:
    print(f"[ablate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _main(args) -> int:
    grid = load_grid(args.grid, args.overrides)
    if args.seeds:
        grid.restrict_seeds([int(x) for x in args.seeds.split(",") if x.strip()])
    out = os.path.abspath(args.out or os.path.join("runs", "ablate", grid.name + ("-quick" if args.quick else "")))
    specs = grid.runs(out, quick=args.quick)
    launcher = shlex.split(args.launcher) if args.launcher else default_launcher()
    if args.only:
        wanted = [v.strip() for v in args.only.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in grid.variants]
        if unknown:
            raise GridError(f"--only names unknown variant(s) {', '.join(unknown)}; the grid has "
                            f"{', '.join(grid.variants)}.")
        todo = [s for s in specs if s.variant in wanted]
    else:
        todo = list(specs)

    if args.task is not None:  # one Slurm array task
        if not 0 <= args.task < len(specs):
            raise GridError(f"--task {args.task} is outside the grid's {len(specs)} runs.")
        todo = [specs[args.task]]
    configs = check_runs(todo, args.world_size)
    for spec in todo:
        check_not_stale(spec)

    if args.list:
        for i, spec in enumerate(specs):
            print(f"{i:3d}  {run_state(spec):8s} {spec.name:40s} {spec.run_dir}")
        return 0
    if args.report_only:
        _report(grid, specs, out, args)
        return 0
    if args.slurm:
        return _submit(grid, specs, todo, out, args)

    _say(f"grid {grid.name}: {len(todo)} of {len(specs)} runs under {out}" + (" (quick)" if args.quick else ""))
    failed, rc_all = [], 0
    t_grid = time.time()
    for n, spec in enumerate(todo, 1):
        state = run_state(spec)
        if state == DONE:
            _say(f"[{n}/{len(todo)}] {spec.name}: finished before, skipped")
            continue
        steps = configs[spec.name].train.steps
        _say(f"[{n}/{len(todo)}] {spec.name}: {'resuming' if state != 'new' else 'starting'} "
             f"({steps} steps; log {os.path.join(spec.run_dir, 'train.log')})")
        attempt = _run_with_bar(spec, launcher, steps, f"{n}/{len(todo)} {spec.name}")
        if attempt.rc == 0:
            _say(f"[{n}/{len(todo)}] {spec.name}: done in {attempt.wall_s:.0f} s")
        elif attempt.rc == REQUEUE_EXIT or attempt.signalled:
            saved = "checkpoint saved" if attempt.rc == REQUEUE_EXIT else "stopped before it could save"
            _say(f"[{n}/{len(todo)}] {spec.name}: stopped by a signal (exit {attempt.rc}, {saved}); repeat the "
                 f"command to resume from its newest checkpoint")
            if args.task is None:
                _report(grid, specs, out, args)
            return REQUEUE_EXIT
        else:
            _say(f"[{n}/{len(todo)}] {spec.name}: FAILED with exit {attempt.rc}; last lines of its log:\n"
                 + _tail(os.path.join(spec.run_dir, "train.log")))
            failed.append(spec.name)
            rc_all = 1
            if args.fail_fast:
                break
        if args.task is None:
            _report(grid, specs, out, args)
    if args.task is not None:
        return rc_all
    _report(grid, specs, out, args)
    _say(f"grid {grid.name}: {len(todo) - len(failed)} of {len(todo)} runs ok in {time.time() - t_grid:.0f} s"
         + (f"; failed: {', '.join(failed)}" if failed else ""))
    return rc_all


def _run_with_bar(spec, launcher, steps, desc):
    from tqdm import tqdm

    with tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True, file=sys.stdout,
              disable=not sys.stdout.isatty()) as bar:
        last = {"step": -1, "printed": 0.0}

        def progress(step):
            bar.n = step
            bar.refresh()
            # Without a terminal (CI, nohup): a line every 30 s instead of a bar.
            if not sys.stdout.isatty() and step != last["step"] and time.time() - last["printed"] > 30:
                _say(f"    {desc}: step {step}/{steps}")
                last["printed"] = time.time()
            last["step"] = step

        return run_one(spec, launcher, on_progress=progress)


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return "(no log)"


def _report(grid, specs, out, args) -> None:
    from heptapod_ds.experiments.plots import plot_scores
    from heptapod_ds.experiments.report import render, write_report
    from heptapod_ds.experiments.results import collect

    report = os.path.abspath(args.report or os.path.join(out, "report.md"))
    plots_dir = os.path.splitext(report)[0] + "_plots"
    variants = collect(specs, grid.variants_as_strings())
    plots = plot_scores(variants, plots_dir, grid.name)
    write_report(report, render(grid, variants, plots, report, args.quick, out), f"Ablation grid {grid.name}")
    _say(f"report: {report} ({len(plots)} plots in {plots_dir})")


def _submit(grid, specs, todo, out, args) -> int:
    from heptapod_ds.experiments.slurm import ARRAY_SCRIPT, array_script, submit

    indices = [specs.index(s) for s in todo if run_state(s) != DONE]
    tool_args = [*args.overrides] + (["--quick"] if args.quick else []) + \
        (["--seeds", args.seeds] if args.seeds else []) + \
        (["--launcher", args.launcher] if args.launcher else [])
    python = os.path.join(REPO, ".venv", "bin", "python") if os.path.isfile(
        os.path.join(REPO, ".venv", "bin", "python")) else sys.executable
    script = array_script(os.path.abspath(args.grid), out, indices, f"ablate-{grid.name}", python, tool_args,
                          args.sbatch_arg, repo=REPO)
    os.makedirs(os.path.join(out, "slurm"), exist_ok=True)
    path = os.path.join(out, ARRAY_SCRIPT)
    with open(path, "w") as fh:
        fh.write(script)
    _say(f"wrote {path}: {len(indices)} array tasks ({', '.join(specs[i].name for i in indices)})")
    if args.dry_run:
        _say("--dry-run: nothing submitted; submit with: sbatch " + path)
        return 0
    report_cmd = [python, os.path.join(REPO, "tools", "ablate.py"), os.path.abspath(args.grid), "--out", out,
                  "--report-only", *tool_args] + (["--report", os.path.abspath(args.report)] if args.report else [])
    keep = [a for a in args.sbatch_arg if a.split("=")[0] in ("--partition", "-p", "--account", "-A", "--qos")]
    array_id, report_id = submit(path, out, report_cmd, f"ablate-{grid.name}", sbatch=args.sbatch, sbatch_args=keep)
    _say(f"submitted array job {array_id} and report job {report_id} (runs after every task ended); "
         f"logs in {os.path.join(out, 'slurm')}")
    return 0


if __name__ == "__main__":
    from heptapod_ds.distributed.process_exit import exit_process

    exit_process(main())
