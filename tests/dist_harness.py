"""Run a test function on N gloo ranks on 127.0.0.1 (spawned processes, free port, hard timeout).

Usage inside a test::

    def _body(rank, world_size, arg):   # module-level, so that spawn can pickle it
        ...
        return something_picklable

    results = run_ranks(_body, world_size=2, args=(arg,))   # list indexed by rank

A failure on any rank re-raises in the test with that rank's traceback; a hang is killed at
``timeout`` seconds. ``run_script`` does the same for a command line, torchrun-style.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

from heptapod_ds.distributed.launch_env import free_port


def _rank_env(rank: int, world_size: int, port: int) -> Dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HEPTAPOD_TESTING": "1"}


def _pack(obj) -> bytes:
    """Results travel as bytes: tensors put on a queue as-is are shared-memory handles that die with
    the rank that made them."""
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    import io

    import torch
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(fn, rank, world_size, port, args, queue):
    os.environ.update(_rank_env(rank, world_size, port))
    code = 0
    try:
        import torch
        torch.set_num_threads(1)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, _pack(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        code = 1
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from heptapod_ds.distributed import parallel_state
            if parallel_state.is_initialized():
                parallel_state.destroy()
        except Exception:  # noqa: BLE001
            pass
    queue.close()
    queue.join_thread()  # the result is in the pipe before the process goes
    from heptapod_ds.distributed.process_exit import exit_process

    exit_process(code)  # spawned ranks otherwise pay the interpreter's native tear-down (seconds each)


def run_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 300) -> List[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    # not daemonic: a rank may start processes of its own (FFCV's writer when it builds the digits
    # dataset on a fresh clone); the finally below kills whatever is still alive
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, tuple(args), queue), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{world_size}-rank test did not finish in {timeout:.0f}s; "
                                   f"ranks done: {sorted(results)}, failed: {sorted(errors)}")
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
            except Exception:  # noqa: BLE001 - queue.Empty: check for dead processes
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in results and r not in errors]
                if dead:
                    time.sleep(1.0)  # give the queue a moment to deliver their tracebacks
                    while not queue.empty():
                        rank, ok, payload = queue.get()
                        (results if ok else errors)[rank] = payload
                    dead = [r for r in dead if r not in results and r not in errors]
                    for r in dead:
                        errors[r] = f"rank {r} died with exit code {procs[r].exitcode}"
                    if errors:
                        break
                continue
            (results if ok else errors)[rank] = payload
            if errors:
                # give the other ranks a moment so their errors are reported too
                time.sleep(0.5)
                while not queue.empty():
                    rank, ok, payload = queue.get()
                    (results if ok else errors)[rank] = payload
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"distributed test failed on ranks {sorted(errors)}:\n{msg}")
    return [_unpack(results[r]) for r in range(world_size)]


def run_script(cmd: Sequence[str], world_size: int, timeout: float = 600, env: Optional[Dict[str, str]] = None,
               cwd: Optional[str] = None) -> List[subprocess.CompletedProcess]:
    """Start ``cmd`` once per rank with torchrun's environment variables; wait for all."""
    port = free_port()
    procs = []
    for r in range(world_size):
        e = dict(os.environ)
        e.update(_rank_env(r, world_size, port))
        e.update(env or {})
        procs.append(subprocess.Popen([sys.executable, *cmd] if cmd[0].endswith(".py") else list(cmd),
                                      env=e, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise TimeoutError(f"{' '.join(cmd)} on {world_size} ranks did not finish in {timeout}s")
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, None))
    return outs
