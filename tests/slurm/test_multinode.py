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
        self.last_fault_attempt = -1

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
        job = self.jobs[name]
        prefix = {"train_xl.sh": "heptapod-xl", "sample_fid.sh": "heptapod-fid",
                  "pretokenize.sh": "heptapod-pretokenize"}[job["template"]]
        path = os.path.join(self.root, "logs", f"{prefix}-{job['id']}.out")
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
        elif pending and f.get("JobState") == "RUNNING" and restarts > run.last_fault_attempt:
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
                run.last_fault_attempt = restarts
                pending.pop(0)
        if "fid" not in run.jobs and ref.get("JobState") == "COMPLETED":
            # sample_fid.sh on the two side nodes, from the reference run's final checkpoint
            run.submit("fid", SIDE_SHAPE, "sample_fid.sh", FID_ARGS + ["--out", "runs/fid2"], "runs/fid2")
        side = [run.info(n).get("JobState") for n in ("pretok", "fid") if n in run.jobs]
        ablate_done = _drive_ablate(run)
        done = (ref.get("JobState") in TERMINAL and f.get("JobState") in TERMINAL and not pending and heal is None
                and "fid" in run.jobs and all(st in TERMINAL for st in side) and ablate_done)
        if done:
            return
        time.sleep(0.3)
    pytest.fail(f"the multi-node jobs did not finish within {DEADLINE_S}s\n{run.report('faults')}\n"
                f"{run.report('ref')}")


SIDE_SHAPE = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--partition=side"]
FID_ARGS = ["--ckpt", f"runs/ref/checkpoints/global_step{STEPS}", "--num-samples", "20", "--inception", "none",
            "--batch-size", "5", "--shard-size", "5", "--no-progress"]
PRETOK_ARGS = ["--tokenizer", "patch", "--size", "32", "--shard-size", "2", "--write-workers", "1",
               "--decode-workers", "1", "--no-progress"]
ABLATE_GRID = os.path.join("tests", "experiments", "tiny_grid.yaml")
ABLATE_USR1_AFTER = 3   # steps logged by the preempted array task before scancel --signal=USR1


ABLATE_STEPS, ABLATE_LOG_EVERY, ABLATE_EVAL_EVERY = 20, 5, 10   # tiny_grid.yaml's base + quick


def _ablate_runs(run):
    """metrics.jsonl of each run of the ablation grid (variant/seed0) -> (steps of its training records, steps
    of its evaluation records). Both kinds carry a "step": an evaluation at step 10 is a record of its own beside
    the training record of step 10, not a repeated step."""
    out = os.path.join(run.root, "runs", "ablate")
    found = {}
    for variant in ("next_tiny", "global_tiny"):
        path = os.path.join(out, variant, "seed0", "metrics.jsonl")
        rows = []
        if os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:   # a line being written
                        pass
        found[variant] = ([r["step"] for r in rows if "loss" in r], [r["step"] for r in rows if "eval_samples" in r])
    return found


def _drive_ablate(run) -> bool:
    """Preempt array task 1 once it logged a few steps; True once the array and its report job ended."""
    ab = run.ablate
    if ab.get("array") is None:
        return True
    fields = {}
    for task in (0, 1):
        out = subprocess.run(["scontrol", "show", "job", "-o", f"{ab['array']}_{task}"], env=run.env,
                             capture_output=True, text=True, timeout=30).stdout
        fields[task] = dict(re.findall(r"(\w+)=(\S*)", out))
    ab["tasks"] = fields
    if "usr1" not in ab and fields[1].get("JobState") == "RUNNING":
        steps = _ablate_runs(run)["global_tiny"][0]
        if steps and max(steps) >= ABLATE_USR1_AFTER:
            subprocess.run(["scancel", "--signal=USR1", f"{ab['array']}_1"], env=run.env, check=True, timeout=30)
            ab["usr1"] = max(steps)
    rep = subprocess.run(["scontrol", "show", "job", "-o", ab["report"]], env=run.env, capture_output=True,
                         text=True, timeout=30).stdout
    ab["report_state"] = dict(re.findall(r"(\w+)=(\S*)", rep)).get("JobState")
    return ab["report_state"] in TERMINAL and all(f.get("JobState") in TERMINAL for f in fields.values())


@pytest.fixture(scope="module")
def mrun(tmp_path_factory):
    lacking = missing_requirements()
    if lacking:
        _skip_or_fail("this machine lacks " + "; ".join(lacking))
    root = str(tmp_path_factory.mktemp("mn_repo") / "heptapod_ds")
    git = _fresh_copy(root)
    # n1, n2: the two-node training job and its faults; n3: the one-host reference; n3, n4 ("side"): the
    # two-node sample_fid.sh and pretokenize.sh jobs and the ablation array, away from the injected faults.
    cluster = MultiNodeSlurm(nodes=4, partitions={"side": [2, 3]})
    t0 = time.time()
    try:
        cluster.start()
    except Exception as e:  # noqa: BLE001 - say why, with the daemons' logs
        cluster.stop()
        _skip_or_fail(f"the multi-node test cluster could not be built: {e}")
    run = Run(cluster, root)
    run.git, run.started_s = git, round(time.time() - t0, 1)
    n1, n2, n3, n4 = cluster.nodes
    images = tmp_path_factory.mktemp("images")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
    from data_helpers import make_image_folder
    make_image_folder(images, corrupt=False)
    run.images = str(images)
    run.ablate = {}
    try:
        run.submit("ref", ["--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=0", "--cpus-per-task=1",
                           f"--nodelist={n3}"], "train_xl.sh", [*SMALL, *TP2], "runs/ref")
        run.submit("faults", ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                              f"--exclude={n3},{n4}"], "train_xl.sh", [*SMALL, *TP2], "runs/faults")
        run.submit("pretok", SIDE_SHAPE, "pretokenize.sh", ["--input", str(images), "--output",
                                                            "data/two.beton", *PRETOK_ARGS], "data")
        # tools/ablate.py --slurm against the real controller: a 2-task array and its report job
        r = subprocess.run([sys.executable, "tools/ablate.py", ABLATE_GRID, "--quick", "--seeds", "0", "--out",
                            "runs/ablate", "--slurm", "--sbatch-arg=--partition=side", "--sbatch-arg=--cpus-per-task=1"],
                           cwd=root, env=run.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        ids = re.search(r"submitted array job (\d+) and report job (\d+)", r.stdout)
        assert ids, r.stdout
        run.ablate.update(array=ids.group(1), report=ids.group(2), submit_out=r.stdout)
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
    cluster = mrun.cluster
    launches = [r for r in _launches(mrun, "faults") if r["event"] == "launch"]
    assert [r["attempt"] for r in launches] == list(range(int(mrun.jobs["faults"]["info"]["Restarts"]) + 1))
    for rec in launches:
        assert rec["layout"] == {"world": 4, "tensor": 2, "pipeline": 1, "data": 2}
        ranks = rec["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
        assert all(int(r["slurm_procid"]) == r["rank"] for r in ranks), ranks   # global rank = SLURM_PROCID
        hosts = [r["host"] for r in ranks]
        # srun's block distribution: ranks 0, 1 on the first node (the TP=2 group inside one node), 2, 3 on
        # the second; the data-parallel pairs (0, 2) and (1, 3) cross the nodes.
        assert hosts[0] == hosts[1] != hosts[2] == hosts[3] and set(hosts) <= set(cluster.nodes[:2]), ranks
        assert [r["local_rank"] for r in ranks] == [0, 1, 0, 1] == [int(r["slurm_localid"]) for r in ranks]
        assert rec["master"]["addr"] == hosts[0] == rec["host"], rec["master"]   # rank 0 on MASTER_ADDR
        # What gloo advertises: each host's own bridge address, not a loopback one.
        assert [r["address"] for r in ranks] == [cluster.addr[h] for h in hosts], ranks
        assert ranks[0]["address"] != ranks[2]["address"]
        assert rec["slurm"]["job_num_nodes"] == "2" and rec["slurm"]["job_id"] == mrun.jobs["faults"]["id"]
    ref = [r for r in _launches(mrun, "ref") if r["event"] == "launch"]
    assert len(ref) == 1 and {r["host"] for r in ref[0]["ranks"]} == {cluster.nodes[2]}
    assert [r["local_rank"] for r in ref[0]["ranks"]] == [0, 1, 2, 3]
    log = mrun.log("faults")
    assert "4 tasks on 2 node(s)" in log, mrun.report("faults")
    print(f"rank map (attempt 0): {[(r['rank'], r['host'], r['local_rank'], r['address']) for r in launches[0]['ranks']]}"
          f", master {launches[0]['master']}")


def _resumed_steps(run, name):
    return [int(m) for m in re.findall(r"resumed at step (\d+)", run.log(name))]


def _attempt_logs(log, job_id):
    """The batch log cut into attempts: attempt -> its text, from the batch script's "job N attempt K:" line to
    the next attempt's (what slurmstepd and srun write about attempt K comes before attempt K + 1 starts)."""
    marks = [(int(m.group(1)), m.start()) for m in re.finditer(rf"\] job {job_id} attempt (\d+):", log)]
    return {a: log[start:(marks[i + 1][1] if i + 1 < len(marks) else len(log))] for i, (a, start) in enumerate(marks)}


def _spurious(rec, node):
    """The stop of a resumed attempt by Slurm's delayed kill of the failed attempt's step (same job id) on the
    node that came back: SIGTERM on that node's ranks only, the checkpoint saved, exit 75."""
    sigs = rec.get("signals") or {}
    return (rec["status"] == "preempted" and rec["exit_code"] == 75 and list(sigs) == ["SIGTERM"]
            and sigs["SIGTERM"]["hosts"] == [node] and rec["signal"] == "SIGTERM")


def test_every_attempt_says_what_stopped_it_and_what_was_lost(mrun):
    f = mrun.jobs["faults"]
    records = _launches(mrun, "faults")
    exits = {r["attempt"]: r for r in records if r["event"] == "exit"}
    launches = [r["attempt"] for r in records if r["event"] == "launch"]
    faults = [e for e in mrun.events if e["what"] in ("usr1", "crash", "partition")]
    log = mrun.log("faults")
    assert len(faults) == len(FAULTS), mrun.report("faults")
    attempts = [e["attempt"] for e in faults]           # the attempt each fault was injected into
    final = int(f["info"].get("Restarts"))
    assert launches == list(range(final + 1)) and exits[final]["status"] == "done", mrun.report("faults")
    resumed = dict(zip(range(1, final + 1), _resumed_steps(mrun, "faults")))   # attempt -> step it resumed at
    # One attempt per fault. (With cred_expire < 60 s a requeued attempt can start before slurmctld's retried
    # kill of the attempt it replaced reaches the node that came back, and is stopped by it: SIGTERM on that
    # node's ranks only. The exit record then names it; see _spurious and slurm/_train.sh.)
    extra = [a for a in range(final) if a not in attempts]
    assert not extra and final == len(FAULTS), ([exits.get(a) for a in extra], mrun.report("faults"))
    for a in extra:
        before = max(i for i in attempts if i < a)
        node = faults[attempts.index(before)]["node"]
        assert faults[attempts.index(before)]["what"] in ("crash", "partition") and _spurious(exits[a], node), \
            (a, exits.get(a), mrun.report("faults"))
        assert resumed[a + 1] == exits[a]["step"]
        assert "SIGTERM reached the tasks but not this batch shell" in log, log
    # attempt 0: scancel --signal=USR1 reached every task; all saved the same step and exited 75; requeued.
    usr1 = exits[attempts[0]]
    assert (usr1["status"], usr1["exit_code"], usr1["signal"]) == ("preempted", 75, "SIGUSR1"), usr1
    assert usr1["signals"]["SIGUSR1"]["ranks"] == [0, 1, 2, 3] and len(usr1["signals"]["SIGUSR1"]["hosts"]) == 2
    assert usr1["step"] == resumed[attempts[0] + 1] and f"requeueing job {f['id']}" in log
    assert "stopped by SIGUSR1 on ranks [0, 1, 2, 3]" in log, log
    # the non-batch node crashed: the surviving ranks named the failed step and the checkpoint.
    crash = exits[attempts[1]]
    assert crash["status"] == "failed" and crash["reason"] == "collective", crash
    assert crash["failed_step"] == crash["step"] + 1 and crash["step"] >= faults[1]["after_step"]
    assert crash["resume_from"].endswith(f"global_step{resumed[attempts[1] + 1]}"), (crash, resumed)
    # the batch host crashed with rank 0 on it: no exit record can exist; Slurm requeued the job.
    assert attempts[2] not in exits, exits.get(attempts[2])
    # the link of the non-batch node went down mid-step: the other ranks stopped within the collective
    # timeout with the step and the checkpoint; the batch script says Slurm requeues it.
    part = exits[attempts[3]]
    if part["status"] == "failed":
        # the surviving ranks' collective either times out (parallel.collective_timeout_s) or is closed first by a
        # peer that Slurm's kill of the step (on node failure) ended; either way a collective failure at that step
        assert part["reason"] == "collective", part
        assert "Timed out" in part["error"] or "Connection closed by peer" in part["error"], part
        assert part["resume_from"].endswith(f"global_step{resumed[attempts[3] + 1]}") and part["step"] is not None
    else:
        # or the controller's verdict (node DOWN after SlurmdTimeout, 10 s) came before the collective timeout
        # (20 s): the link is back at that verdict (the heal above), the blocked step completes, and Slurm's kill of
        # the requeued job's steps (SIGTERM) makes every rank save that step and exit 75: nothing lost
        assert (part["status"], part["exit_code"], part["signal"]) == ("preempted", 75, "SIGTERM"), part
        assert list(part["signals"]) == ["SIGTERM"] and part["step"] == resumed[attempts[3] + 1], (part, resumed)
    # What the log says of the two node failures the batch host survived (the non-batch node crashed, its link
    # cut). On its verdict (the node DOWN after SlurmdTimeout) slurmctld requeues the job and the batch step
    # ends at once, SIGKILL without SIGTERM first (slurmd's log: "CANCELLED ... DUE TO NODE FAILURE", then "done
    # with job" ~10 ms later), usually while srun still waits for the lost node's tasks: then only slurmstepd's
    # line is there, which Slurm writes into the batch log on that verdict. The batch script's own line comes only
    # when srun returned first (it then waits for the verdict, see launch_await_node_verdict). Either is a
    # statement that the node failed; "not requeueing" would be false.
    sections = _attempt_logs(log, f["id"])
    for ev in (faults[1], faults[3]):
        text = sections.get(ev["attempt"], "")
        said = re.search(rf"node\(s\) {ev['node']} of this job stopped responding; Slurm requeues a job that loses a "
                         rf"node", text)
        cancelled = re.search(rf"\*\*\* JOB {f['id']} ON {ev['batch_host']} CANCELLED AT \S+ DUE TO NODE FAILURE", text)
        assert said or cancelled, (ev, text[-6000:])
        assert "not requeueing from here" not in text and "is not requeued from here" not in text, (ev, text[-6000:])
    assert exits[final]["step"] == STEPS
    # Nothing on disk was lost: every checkpoint left verifies.
    r = subprocess.run([sys.executable, "-m", "heptapod_ds.engine.integrity",
                        os.path.join(mrun.root, f["run_dir"], "checkpoints")], cwd=mrun.root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = []
    for ev, (kind, which, _) in zip(faults, FAULTS):
        a = ev["attempt"]
        done = exits[a]["step"] if a in exits else ev["after_step"]
        rows.append((kind, which, ev["node"], ev["after_step"], done, resumed[a + 1], done - resumed[a + 1]))
    for a in extra:
        rows.append(("spurious SIGTERM (delayed kill of the failed attempt's step)", "returned",
                     list(exits[a]["signals"]["SIGTERM"]["hosts"]), None, exits[a]["step"], resumed[a + 1],
                     exits[a]["step"] - resumed[a + 1]))
    print("multi-node fault rows (kind, node role, node, injected after step, steps done, resumed from, steps lost):")
    for row in rows:
        print("  ", row)
    print(f"all checkpoints verify (0 bytes lost); attempts {f['states']}; events {mrun.events}")
    assert rows[0][-1] == 0  # the preemption loses nothing


def _sha256(path):
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_sample_fid_on_two_nodes_equals_one_process(mrun):
    job = mrun.jobs["fid"]
    assert job["info"]["JobState"] == "COMPLETED", mrun.report("fid")
    two = os.path.join(mrun.root, "runs", "fid2")
    one = os.path.join(mrun.root, "runs", "fid1")
    env = {k: v for k, v in mrun.env.items() if k != "SLURM_CONF"}
    r = subprocess.run([sys.executable, "tools/sample_fid.py", *FID_ARGS, "--out", one], cwd=mrun.root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = open(os.path.join(one, "samples.npz"), "rb").read(), open(os.path.join(two, "samples.npz"), "rb").read()
    assert a == b, "samples.npz of 2 nodes differs from 1 process"
    assert "2 tasks on 2 node(s)" in mrun.log("fid"), mrun.report("fid")
    print(f"sample_fid.sh: job {job['id']} on 2 nodes, samples.npz {len(b)} bytes == 1 process "
          f"(sha256 {_sha256(os.path.join(two, 'samples.npz'))[:16]})")


def test_pretokenize_on_two_nodes_equals_one_process(mrun):
    job = mrun.jobs["pretok"]
    assert job["info"]["JobState"] == "COMPLETED", mrun.report("pretok")
    assert "2 tasks on 2 node(s)" in mrun.log("pretok"), mrun.report("pretok")
    one = os.path.join(mrun.root, "data", "one.beton")
    env = {k: v for k, v in mrun.env.items() if k != "SLURM_CONF"}
    r = subprocess.run([sys.executable, "tools/pretokenize.py", "--input", mrun.images, "--output", one,
                        *PRETOK_ARGS], cwd=mrun.root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = os.path.join(mrun.root, "data", "two.beton")
    assert _sha256(one) == _sha256(two), "the beton of 2 nodes differs from 1 process"
    print(f"pretokenize.sh: job {job['id']} on 2 nodes, beton sha256 {_sha256(two)[:16]} == 1 process")


def test_ablate_array_on_the_real_controller_requeues_its_preempted_task(mrun):
    ab = mrun.ablate
    assert "usr1" in ab, f"array task 1 finished before it could be signalled: {ab}"
    for task in (0, 1):
        assert ab["tasks"][task].get("JobState") == "COMPLETED", ab
    assert ab["tasks"][1].get("Restarts") == "1" and ab["tasks"][0].get("Restarts") == "0", ab
    assert ab["report_state"] == "COMPLETED", ab
    logs = os.path.join(mrun.root, "runs", "ablate", "slurm")
    text = "".join(open(os.path.join(logs, n), errors="replace").read() for n in sorted(os.listdir(logs)))
    # the array task's log keeps both attempts (--open-mode=append): the save and requeue, then the resume
    assert "saved a checkpoint after a preemption signal; requeueing" in text, text[-4000:]
    assert re.search(r"global_tiny/seed0: resuming \(20 steps", text), text[-4000:]
    # each step logged once, each evaluation once: the preempted task's first attempt logged nothing after the
    # checkpoint it resumed from that the second attempt did not drop (metrics.jsonl is cut back on resume)
    want = (list(range(ABLATE_LOG_EVERY, ABLATE_STEPS + 1, ABLATE_LOG_EVERY)),
            list(range(ABLATE_EVAL_EVERY, ABLATE_STEPS + 1, ABLATE_EVAL_EVERY)))
    for variant, logged in _ablate_runs(mrun).items():
        assert logged == want, (variant, logged, want)
    print(f"ablate --slurm: array {ab['array']} (2 tasks), task 1 preempted after step {ab['usr1']}, requeued, "
          f"finished; report job {ab['report']} {ab['report_state']}")
