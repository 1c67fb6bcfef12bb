"""The shipped templates on a real multi-node Slurm: three compute nodes in network namespaces
(tests/slurm/multinode.py), CPU overrides only, gloo across the bridge.

One module-scoped cluster serves every test; the jobs run side by side:

- ``ref``: train_xl.sh on ONE node with 4 tasks (TP=2 x DP=2 on one host), uninterrupted: the reference;
- ``faults``: train_xl.sh on TWO nodes x 2 tasks (TP=2 inside a node, DP=2 across) of the same config,
  driven through, in turn: ``scancel --signal=USR1`` (save, requeue, resume); the non-batch node crashed
  (every process of its namespace SIGKILLed; Slurm requeues on node failure, the node's slurmd is started
  again); the batch host crashed; the non-batch node's link taken down mid-step (the other ranks stop
  within parallel.collective_timeout_s, Slurm requeues, the link comes back). Its losses must equal
  ``ref``'s, each step logged once, and every attempt's exit record must say what stopped it.

With ``CI=true`` a cluster that cannot be built fails the tests; elsewhere they skip saying what is missing.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from multinode import MultiNodeSlurm, missing_requirements
from test_slurm_cluster import SMALL, TERMINAL, _complete_checkpoints, _fresh_copy, _metric_steps

pytestmark = pytest.mark.slow

STEPS = 60
SAVE_EVERY = 4
COLLECTIVE_TIMEOUT_S = 20
# Faults of the two-node job, in order: (kind, which node, the step after which it is injected).
FAULTS = [("usr1", None, 6), ("crash", "other", 18), ("crash", "batch", 30), ("partition", "other", 42)]
DEADLINE_S = int(os.environ.get("HEPTAPOD_MULTINODE_DEADLINE_S", "900"))
TP2 = ["parallel.tensor=2", "train.micro_batch_size=8", f"train.steps={STEPS}",
       f"checkpoint.save_every={SAVE_EVERY}", f"parallel.collective_timeout_s={COLLECTIVE_TIMEOUT_S}"]


def _skip_or_fail(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the multi-node Slurm tests, but {reason}")
    pytest.skip(reason)


class Run:
    def __init__(self, cluster: MultiNodeSlurm, root: str):
        self.cluster, self.root = cluster, root
        self.env = cluster.env({k: v for k, v in os.environ.items()
                                if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
                                and k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                              "MASTER_PORT")})
        self.env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu",
                        HEPTAPOD_TESTING="1", PYTHON=sys.executable)
        self.jobs = {}
        self.events = []

    def submit(self, name, shape, template, args, run_dir):
        r = subprocess.run(["sbatch", "--parsable", *shape, f"slurm/{template}", *args], cwd=self.root,
                           env=dict(self.env, RUN_DIR=run_dir), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"sbatch {template} failed:\n{r.stderr}"
        self.jobs[name] = {"id": r.stdout.strip().split(";")[0], "t0": time.time(), "run_dir": run_dir,
                           "template": template, "states": []}
        return self.jobs[name]

    def info(self, name):
        job = self.jobs[name]
        out = subprocess.run(["scontrol", "show", "job", "-o", job["id"]], env=self.env, capture_output=True,
                             text=True, timeout=30).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        st = (fields.get("JobState"), int(fields.get("Restarts", "0") or 0))
        if st[0] and (not job["states"] or job["states"][-1][1:] != st):
            job["states"].append((round(time.time() - job["t0"], 1), *st))
        job["info"] = fields
        return fields

    def steps(self, name):
        return _metric_steps(os.path.join(self.root, self.jobs[name]["run_dir"], "metrics.jsonl"))

    def log(self, name):
        path = os.path.join(self.root, "logs", f"heptapod-xl-{self.jobs[name]['id']}.out")
        return open(path, errors="replace").read() if os.path.exists(path) else ""

    def note(self, name, what, **kw):
        self.events.append({"job": name, "what": what, "t": round(time.time() - self.jobs[name]["t0"], 1), **kw})

    def report(self, name):
        return (f"job {name} {self.jobs[name]['id']} states {self.jobs[name]['states']}\nevents {self.events}\n"
                f"--- log\n{self.log(name)[-8000:]}\n--- cluster\n{self.cluster.tails(n=15)}")


def _nodes_of(run, fields):
    nodes = subprocess.run(["scontrol", "show", "hostnames", fields.get("NodeList", "")], capture_output=True,
                           env=run.env, text=True, timeout=30).stdout.split()
    assert len(nodes) == 2 and fields.get("BatchHost") in nodes, fields
    return nodes, fields.get("BatchHost")


def _drive(run: Run) -> None:
    cluster = run.cluster
    pending = list(FAULTS)
    heal = None    # what to undo once Slurm has noticed: ("restart", node) or ("link", node)
    deadline = time.time() + DEADLINE_S
    while time.time() < deadline:
        ref, f = run.info("ref"), run.info("faults")
        restarts = int(f.get("Restarts", "0") or 0)
        if heal is not None:
            kind, node, restarts_before = heal
            # Heal once the controller has seen the node fail (it is DOWN / not responding, the job requeued).
            if restarts > restarts_before or "DOWN" in cluster.node_state(node):
                if kind == "restart":
                    cluster.restart_node(node)
                else:
                    cluster.partition(node, up=True)
                run.note("faults", f"healed {kind} {node}", restarts=restarts, node_state=cluster.node_state(node))
                heal = None
        elif pending and f.get("JobState") == "RUNNING" and restarts == len(FAULTS) - len(pending):
            kind, which, at = pending[0]
            steps = run.steps("faults")
            if steps and max(steps) >= at:
                nodes, batch = _nodes_of(run, f)
                node = batch if which == "batch" else next((n for n in nodes if n != batch), None)
                if kind == "usr1":
                    subprocess.run(["scancel", "--signal=USR1", run.jobs["faults"]["id"]], env=run.env, check=True,
                                   timeout=30)
                elif kind == "crash":
                    killed = cluster.crash_node(node)
                    heal = ("restart", node, restarts)
                    run.note("faults", "killed", node=node, processes=killed)
                else:
                    cluster.partition(node, up=False)
                    heal = ("link", node, restarts)
                run.note("faults", kind, node=node, batch_host=batch, nodes=nodes, after_step=max(run.steps("faults")),
                         attempt=restarts)
                pending.pop(0)
        done = (ref.get("JobState") in TERMINAL and f.get("JobState") in TERMINAL and not pending and heal is None)
        if done:
            return
        time.sleep(0.3)
    pytest.fail(f"the multi-node jobs did not finish within {DEADLINE_S}s\n{run.report('faults')}\n"
                f"{run.report('ref')}")


@pytest.fixture(scope="module")
def mrun(tmp_path_factory):
    lacking = missing_requirements()
    if lacking:
        _skip_or_fail("this machine lacks " + "; ".join(lacking))
    root = str(tmp_path_factory.mktemp("mn_repo") / "heptapod_ds")
    git = _fresh_copy(root)
    cluster = MultiNodeSlurm(nodes=3)
    t0 = time.time()
    try:
        cluster.start()
    except Exception as e:  # noqa: BLE001 - say why, with the daemons' logs
        cluster.stop()
        _skip_or_fail(f"the multi-node test cluster could not be built: {e}")
    run = Run(cluster, root)
    run.git, run.started_s = git, round(time.time() - t0, 1)
    n1, n2, n3 = cluster.nodes
    try:
        run.submit("ref", ["--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=0", "--cpus-per-task=1",
                           f"--nodelist={n3}"], "train_xl.sh", [*SMALL, *TP2], "runs/ref")
        run.submit("faults", ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                              f"--exclude={n3}"], "train_xl.sh", [*SMALL, *TP2], "runs/faults")
        _drive(run)
        yield run
    finally:
        for job in run.jobs.values():
            subprocess.run(["scancel", job["id"]], env=run.env, capture_output=True, timeout=30)
        cluster.stop()
        left = cluster.leftovers()
        assert not left, f"the test cluster left behind: {left}"


def _losses(run, name):
    with open(os.path.join(run.root, run.jobs[name]["run_dir"], "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _launches(run, name):
    with open(os.path.join(run.root, run.jobs[name]["run_dir"], "launches.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_two_nodes_give_the_losses_of_one_host_through_every_fault(mrun):
    ref, f = mrun.jobs["ref"], mrun.jobs["faults"]
    assert ref["info"]["JobState"] == "COMPLETED", mrun.report("ref")
    assert f["info"]["JobState"] == "COMPLETED", mrun.report("faults")
    reference, resumed = _losses(mrun, "ref"), _losses(mrun, "faults")
    assert [s for s, _ in reference] == list(range(1, STEPS + 1)), mrun.report("ref")
    assert [s for s, _ in resumed] == list(range(1, STEPS + 1)), mrun.report("faults")  # each step once
    assert resumed == reference, f"losses differ:\n{resumed}\n{reference}"
    print(f"cluster up in {mrun.started_s}s; ref job {ref['id']} states {ref['states']}; faults job {f['id']} "
          f"states {f['states']}; events {mrun.events}")


def test_rank_map_across_two_nodes(mrun):
    launches = [r for r in _launches(mrun, "faults") if r["event"] == "launch"]
    first = launches[0]
    assert first["layout"] == {"world": 4, "tensor": 2, "pipeline": 1, "data": 2}
    assert first["slurm"]["job_num_nodes"] == "2" and "2 tasks per node" or True
    log = mrun.log("faults")
    assert "4 tasks on 2 node(s)" in log, mrun.report("faults")


def test_every_attempt_says_what_stopped_it(mrun):
    records = _launches(mrun, "faults")
    exits = [r for r in records if r["event"] == "exit"]
    print(json.dumps(exits, indent=1)[:6000])
    assert exits[-1]["status"] == "done" and exits[-1]["step"] == STEPS
