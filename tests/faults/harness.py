"""Drive heptapod_ds/train.py through faults on CPU and record a table of fault x outcome.

Each scenario launches the real entry point (through ``run_train.py``, which adds two test-only
faults) on 1, 2 or 4 gloo ranks with the tiny preset shrunk further, injects one fault, restarts as
Slurm's requeue would (``checkpoint.resume=auto``), and compares with an uninterrupted reference run of
the same layout: the loss of every step and every tensor of the final checkpoint (model, optimizer,
LR schedule, EMA, RNG states, data position) must be bit-identical.

Columns of the table: what was done, the layout, what happened, survived (the restart finished
identical to the reference and nothing intact was damaged), steps lost (steps done before the fault
minus the step the restart resumed from) and bytes lost (bytes of checkpoints that no longer verify and
were not moved aside on purpose, plus bytes deleted other than by ``checkpoint.keep_last``).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRIVER = HERE / "run_train.py"
REQUEUE = 75

# The tiny preset, smaller still: every part (global head, EMA, checkpoints) in well under a second a step.
SMALL = ["backbone.depth=2", "backbone.width=32", "backbone.num_heads=2", "head.depth=1", "head.width=32",
         "head.num_heads=2", "head.timesteps=2", "head.supervised=4", "train.global_batch_size=16",
         "train.grad_accum=0", "train.ema_decay=0.9", "optimizer.lr=3e-3", "schedule.warmup_steps=2",
         "data.num_workers=1", "logging.log_every=1", "logging.progress_bar=false", "sampling.eval_per_class=0"]


@dataclass
class Row:
    fault: str
    setting: str
    outcome: str = ""
    survived: bool = False
    steps_lost: Optional[int] = None
    bytes_lost: Optional[int] = None
    seconds: float = 0.0


@dataclass
class Launch:
    returncodes: List[int]
    output: List[str]
    seconds: float
    first_exit_s: List[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.output)


TABLE: List[Row] = []


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "HEPTAPOD_FAULT_POINT", "HEPTAPOD_FAULT_SIGNAL", "HEPTAPOD_TORN_WRITE", "HEPTAPOD_NAN_AT"):
        env.pop(k, None)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu",
                "WANDB_MODE": "disabled", "HEPTAPOD_TESTING": "1", "PYTHONPATH": str(REPO)})
    env.update(extra or {})
    return env


def launch(run_dir, overrides: Sequence[str], world: int = 1, env: Optional[Dict[str, str]] = None,
           timeout: float = 600, ulimit_kb: Optional[int] = None, stopped_rank: Optional[int] = None) -> Launch:
    """Start ``world`` ranks of the trainer (torchrun's variables), wait for all; return codes and output.

    ``stopped_rank``: that rank is expected to stop itself (SIGSTOP fault); once every other rank has
    exited it is killed, as Slurm kills the rest of a job step."""
    from heptapod_ds.distributed.launch_env import free_port

    port = free_port()
    cmd = [sys.executable, str(DRIVER), f"run_dir={run_dir}", *SMALL, *overrides]
    if ulimit_kb is not None:
        cmd = ["bash", "-c", f"ulimit -f {int(ulimit_kb)} && exec \"$@\"", "bash", *cmd]
    procs, logs = [], []
    t0 = time.monotonic()
    for r in range(world):
        e = _env(env)
        if world > 1:
            e.update({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                      "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        log = open(pathlib.Path(run_dir).parent / f".{pathlib.Path(run_dir).name}-rank{r}-{time.time_ns()}.log",
                   "w+")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=e, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    exit_s: List[float] = [0.0] * world
    deadline = t0 + timeout
    try:
        while True:
            alive = [r for r, p in enumerate(procs) if p.poll() is None]
            for r, p in enumerate(procs):
                if p.returncode is not None and not exit_s[r]:
                    exit_s[r] = time.monotonic() - t0
            if not alive:
                break
            if stopped_rank is not None and alive == [stopped_rank]:
                procs[stopped_rank].kill()
                procs[stopped_rank].wait()
                continue
            if time.monotonic() > deadline:
                tails = []
                for r, log in enumerate(logs):
                    log.flush()
                    with open(log.name) as fh:
                        tails.append(f"--- rank {r}:\n{fh.read()[-3000:]}")
                raise TimeoutError(f"{world} ranks of {' '.join(overrides)} still running after {timeout}s "
                                   f"(ranks alive: {alive})\n" + "\n".join(tails))
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        out = []
        for log in logs:
            log.seek(0)
            out.append(log.read())
            log.close()
            os.unlink(log.name)
    return Launch([p.returncode for p in procs], out, time.monotonic() - t0, exit_s)


def ok(result: Launch, code: int = 0, ranks: Optional[Sequence[int]] = None) -> None:
    for r, rc in enumerate(result.returncodes):
        if ranks is not None and r not in ranks:
            continue
        assert rc == code, f"rank {r} exited {rc}, wanted {code}\n{result.output[r][-6000:]}"


# --------------------------------------------------------------------------- reading a run directory


def losses(run_dir) -> Dict[int, float]:
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice in {run_dir}: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoints(run_dir) -> List[pathlib.Path]:
    root = pathlib.Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if re.fullmatch(r"global_step\d+", p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len("global_step"):]))


def intact(run_dir) -> List[int]:
    """Steps of the complete checkpoints that verify."""
    from heptapod_ds.engine.integrity import verify_checkpoint

    return [int(p.name[len("global_step"):]) for p in checkpoints(run_dir)
            if (p / "heptapod_meta.json").is_file() and not verify_checkpoint(p)]


def bytes_lost(run_dir) -> int:
    """Bytes of checkpoints that look complete but do not verify (a damaged one moved aside is kept whole,
    and counts as not lost), plus leftovers that hide a checkpoint (none expected)."""
    from heptapod_ds.engine.integrity import verify_checkpoint

    lost = 0
    for p in checkpoints(run_dir):
        if (p / "heptapod_meta.json").is_file() and verify_checkpoint(p):
            lost += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return lost


def _flatten(obj, prefix: str, out: Dict[str, object]) -> None:
    import numpy as np
    import torch

    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}[{i}]", out)
    elif torch.is_tensor(obj):
        out[prefix] = obj.detach().cpu()
    elif isinstance(obj, np.ndarray):
        out[prefix] = torch.from_numpy(obj.copy())
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = obj


# Leaves that legitimately differ between two runs of the same training: DeepSpeed's bookkeeping and the
# measured wall time (client_state/wall_s); none of the training state.
_VOLATILE = re.compile(r"/(ds_config|ds_version|wall_s)(/|$)")


def _zero3_padding(ckpt: pathlib.Path, tp_rank: int, dp_rank: int):
    """Where this rank's ZeRO-3 partitions hold padding: ``(mask per fp32 flat sub-group, {name: valid length})``.

    DeepSpeed cuts each parameter into ``dp`` pieces of ceil(numel / dp) elements (layout:
    ``heptapod_ds/checkpoint/zero_layout.py``); the last ones end in padding it allocates uninitialised and
    never uses, so two identical runs hold different bytes there (seen: 6e-38 against -1e-10). The padding
    is not training state; everything else is compared."""
    import torch

    from heptapod_ds.checkpoint import zero_layout as zl

    meta = torch.load(ckpt / zl.model_file(3, tp_rank, dp_rank), map_location="cpu", weights_only=False)
    dp = int(meta["dp_world_size"])
    sub_group_size = int(meta["ds_config"]["zero_optimization"].get("sub_group_size", 1_000_000_000))
    masks, valid = [], {}
    for group in meta["param_shapes"]:
        names = list(group)
        numels = [int(torch.Size(group[n]).numel()) for n in names]
        for name, n in zip(names, numels):
            piece = zl.zero3_piece(n, dp)
            valid[name] = max(0, min(piece, n - dp_rank * piece))
        for sub in zl.zero3_sub_groups(numels, dp, sub_group_size):
            masks.append(torch.cat([torch.arange(zl.zero3_piece(numels[i], dp)) < valid[names[i]] for i in sub]))
    return masks, valid


def _without_zero3_padding(ckpt: pathlib.Path, rel: str, obj):
    import torch

    m = re.fullmatch(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt", rel)
    if m:
        masks, _ = _zero3_padding(ckpt, int(m.group(2)), int(m.group(1)))
        groups = obj["optimizer_state_dict"]["fp32_flat_groups"]
        assert len(groups) == len(masks), f"{rel}: {len(groups)} flat groups, the layout gives {len(masks)}"
        obj["optimizer_state_dict"]["fp32_flat_groups"] = [g[k] for g, k in zip(groups, masks)]
    m = re.fullmatch(r"heptapod_rank(\d+)\.pt", rel)
    ema = obj.get("ema") if isinstance(obj, dict) else None
    if m and ema and ema.get("partitioned"):
        meta = json.loads((ckpt / "heptapod_meta.json").read_text())
        tp = int(meta["layout"]["tensor"])
        rank = int(m.group(1))
        # zero_layout.global_rank's order with PP=1: rank = tp_rank + tp * dp_rank
        _, valid = _zero3_padding(ckpt, rank % tp, rank // tp)
        ema["shadow"] = [t[:valid[n]] if torch.is_tensor(t) and t.dim() == 1 else t
                         for n, t in zip(ema["names"], ema["shadow"])]
    return obj


def checkpoint_state(ckpt: pathlib.Path) -> Dict[str, object]:
    """Every tensor and scalar of every file of a checkpoint, by file and key path (ZeRO-3's unused
    partition padding left out)."""
    import torch

    out: Dict[str, object] = {}
    for f in sorted(ckpt.rglob("*.pt")):
        rel = f.relative_to(ckpt).as_posix()
        _flatten(_without_zero3_padding(ckpt, rel, torch.load(f, map_location="cpu", weights_only=False)), rel, out)
    return {k: v for k, v in out.items() if not _VOLATILE.search(k)}


def differences(a: Dict[str, object], b: Dict[str, object]) -> List[str]:
    import torch

    diffs = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if torch.is_tensor(x) or torch.is_tensor(y):
            same = torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape \
                and torch.equal(x, y)
        else:
            same = x == y or (isinstance(x, float) and isinstance(y, float) and x != x and y != y)
        if not same:
            diffs.append(k)
    return diffs


def same_as_reference(run_dir, ref_dir, step: int) -> List[str]:
    """What differs between two runs: losses of every step, and the final checkpoint bit for bit."""
    problems = []
    la, lb = losses(run_dir), losses(ref_dir)
    if la != lb:
        bad = [s for s in sorted(set(la) | set(lb)) if la.get(s) != lb.get(s)]
        problems.append(f"losses differ at steps {bad[:8]}")
    a = pathlib.Path(run_dir) / "checkpoints" / f"global_step{step}"
    b = pathlib.Path(ref_dir) / "checkpoints" / f"global_step{step}"
    if not a.is_dir():
        problems.append(f"no checkpoint {a.name}")
    else:
        d = differences(checkpoint_state(a), checkpoint_state(b))
        if d:
            problems.append(f"{len(d)} checkpoint entries differ, e.g. {d[:4]}")
    return problems


def resumed_step(text: str) -> Optional[int]:
    m = re.search(r"resumed at step (\d+)", text)
    return int(m.group(1)) if m else (0 if "resumed" not in text else None)


def copy_run(src, dst) -> pathlib.Path:
    shutil.copytree(src, dst, symlinks=True)
    return pathlib.Path(dst)


# --------------------------------------------------------------------------- the table


def record(row: Row) -> Row:
    TABLE.append(row)
    return row


def table_markdown(rows: Sequence[Row] = ()) -> str:
    rows = list(rows) or TABLE
    lines = ["| fault | setting | outcome | survived | steps lost | bytes lost |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.fault} | {r.setting} | {r.outcome} | {'yes' if r.survived else 'NO'} | "
                     f"{'-' if r.steps_lost is None else r.steps_lost} | "
                     f"{'-' if r.bytes_lost is None else r.bytes_lost} |")
    return "\n".join(lines)
