"""The slurm/ templates: shell lint, config validation at each template's own world size, and the
exit-status contract between the trainer and the batch script (no Slurm needed here)."""
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM = os.path.join(REPO, "slurm")
TRAIN_TEMPLATES = ("train_b.sh", "train_l.sh", "train_xl.sh", "train_h.sh")
SCRIPTS = sorted(f for f in os.listdir(SLURM) if f.endswith(".sh"))


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        msg = f"'{tool}' is not installed (Debian package {tool}; `bash tools/apt_ensure.sh {tool}`)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " - CI must run this test")
        pytest.skip(msg)
    return path


def sbatch_header(name: str) -> dict:
    """The ``#SBATCH --key=value`` lines of a template."""
    with open(os.path.join(SLURM, name)) as fh:
        return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", fh.read(), flags=re.M))


def dry_run(name: str, world: int, *overrides: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "PYTHONPATH")}
    env.update(SLURM_NTASKS=str(world), SLURM_SUBMIT_DIR=REPO, HEPTAPOD_DRY_RUN="1", **env_extra)
    return subprocess.run(["bash", os.path.join(SLURM, name), *overrides], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def test_scripts_parse_and_are_shellcheck_clean():
    assert {"_launch.sh", "_train.sh", "pretokenize.sh", "sample_fid.sh", *TRAIN_TEMPLATES} <= set(SCRIPTS)
    for name in SCRIPTS:
        r = subprocess.run(["bash", "-n", os.path.join(SLURM, name)], capture_output=True, text=True)
        assert r.returncode == 0, f"bash -n {name}:\n{r.stderr}"
    shellcheck = _need("shellcheck")
    r = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=SLURM, capture_output=True, text=True)
    assert r.returncode == 0, f"shellcheck:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("name", TRAIN_TEMPLATES)
def test_template_validates_at_the_world_size_it_requests(name):
    import yaml

    head = sbatch_header(name)
    world = int(head["nodes"]) * int(head["ntasks-per-node"])
    assert head["output"] == "logs/%x-%j.out" and head["open-mode"] == "append"
    assert re.search(r"^#SBATCH --requeue$", open(os.path.join(SLURM, name)).read(), flags=re.M)
    assert head["signal"] == "USR1@600", "the trainer (job steps) must get the warning, not only the batch shell"
    r = dry_run(name, world)
    assert r.returncode == 0, f"{name} at {world} ranks:\n{r.stdout}\n{r.stderr}"
    cfg = yaml.safe_load(r.stdout)
    par, tr = cfg["parallel"], cfg["train"]
    assert par["world_size"] == world and par["pipeline"] == 1
    dp = world // (par["tensor"] * par["pipeline"])
    assert dp * tr["micro_batch_size"] * tr["grad_accum"] == tr["global_batch_size"] == 2048
    assert cfg["preset"] == name[len("train_"):-len(".sh")].upper()
    # First-run GPU defaults (issue 20): NCCL (a task without a GPU stops at once), megatron's local layers.
    assert par["backend"] == "nccl" and cfg["backbone"]["transformer_impl"] == "local"
    # Documented in the template's own header and in the README table.
    text = open(os.path.join(SLURM, name)).read()
    assert f"TP={par['tensor']}, PP=1, ZeRO-{par['zero_stage']}" in text
    assert f"micro batch {tr['micro_batch_size']} " in text
    readme = open(os.path.join(REPO, "README.md")).read()
    row = (f"| `{name}` | {cfg['preset']} | {head['nodes']} x {head['gpus-per-node']} | {par['tensor']} | 1 | "
           f"{par['zero_stage']} | {tr['micro_batch_size']} | {dp} | {tr['grad_accum']} |")
    assert row in readme, f"README table row missing or stale; expected:\n{row}"


def test_knobs_and_overrides_from_the_command_line():
    import yaml

    # A smaller allocation: grad_accum follows; knobs from the environment; key=value wins last.
    r = dry_run("train_xl.sh", 16, "train.steps=7", TP="4", ZERO="3", PP="1", MICRO_BATCH="16")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["parallel"]["tensor"] == 4 and cfg["parallel"]["zero_stage"] == 3
    assert cfg["train"]["micro_batch_size"] == 16 and cfg["train"]["grad_accum"] == 2048 // (4 * 16)
    assert cfg["train"]["steps"] == 7
    r = dry_run("train_xl.sh", 16, "parallel.zero_stage=1", "parallel.tensor=2", "run_dir=runs/other")
    cfg = yaml.safe_load(r.stdout)
    assert (cfg["parallel"]["zero_stage"], cfg["parallel"]["tensor"], cfg["run_dir"]) == (1, 2, "runs/other")
    r = dry_run("train_xl.sh", 16, DS_CONFIG="ds_configs/zero3.json")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["parallel"]["zero_stage"] == 3
    # The pipeline knob reaches the config (and its validation).
    r = dry_run("train_b.sh", 16, PP="2", ZERO="1", TP="1", MICRO_BATCH="64")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["parallel"]["pipeline"] == 2


def test_invalid_shape_fails_before_srun_with_one_message():
    r = dry_run("train_h.sh", 12)  # 12 ranks: TP=2 -> DP 6; 6 x 32 does not divide 2048
    assert r.returncode == 2
    assert "invalid for 12 tasks" in r.stderr and "global_batch_size=2048" in r.stderr
    r = dry_run("train_h.sh", 128, "no_such.key=1")
    assert r.returncode == 2 and "unknown config key 'no_such.key'" in r.stderr


def test_outside_the_repository_root_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_SUBMIT_DIR=str(tmp_path), SLURM_NTASKS="2")
    r = subprocess.run(["bash", os.path.join(SLURM, "_train.sh")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "not the heptapod_ds repository root" in r.stderr


def test_requeue_status_is_the_trainers():
    guards = open(os.path.join(REPO, "heptapod_ds", "engine", "guards.py")).read()
    code = int(re.search(r"^REQUEUE_EXIT_CODE = (\d+)$", guards, flags=re.M).group(1))
    train = open(os.path.join(SLURM, "_train.sh")).read()
    assert f"REQUEUE_EXIT={code} " in train


def test_logs_directory_exists_in_a_fresh_clone():
    tracked = subprocess.run(["git", "ls-files", "logs"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert "logs/.gitkeep" in tracked.stdout.split()


def test_gpu_defaults_of_the_tasks_environment_and_what_wins_over_them(tmp_path):
    import yaml

    # key=value after the script name wins over the template's GPU defaults (how the CPU tests run them).
    r = dry_run("train_xl.sh", 16, "parallel.backend=gloo", "backbone.transformer_impl=transformer_engine")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["parallel"]["backend"] == "gloo" and cfg["backbone"]["transformer_impl"] == "transformer_engine"

    def launch(script: str, **env_extra: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "PYTORCH_CUDA", "CPU_BIND"))}
        env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[001-002]", PATH=env_extra.pop("PATH", env["PATH"]),
                   **env_extra)
        r = subprocess.run(["bash", "-c", f"source slurm/_launch.sh; {script}"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    shown = 'launch_env; echo "$NCCL_DEBUG|$PYTORCH_CUDA_ALLOC_CONF|$LAUNCH_CPU_BIND|$MASTER_PORT"'
    # No GPUs in the job (the CPU tests): no binding; the NCCL and allocator defaults are exported.
    assert launch(shown, SLURM_GPUS_ON_NODE="0") == "WARN|expandable_segments:True|none|24242"
    # The user's own settings are kept.
    assert launch(shown, NCCL_DEBUG="INFO", PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:512",
                  CPU_BIND="map_cpu:0,1") == "INFO|max_split_size_mb:512|map_cpu:0,1|24242"
    # GPUs: bound to cores where the cluster's TaskPlugin can bind, not where it cannot (task/none).
    fake = str(tmp_path)
    for plugin, expected in (("task/affinity,task/cgroup", "cores"), ("task/none", "none")):
        with open(os.path.join(fake, "scontrol"), "w") as fh:
            fh.write(f"#!/bin/sh\n[ \"$1 $2\" = 'show config' ] && echo 'TaskPlugin              = {plugin}'\n"
                     f"[ \"$1 $2\" = 'show hostnames' ] && echo gpu001\nexit 0\n")
        os.chmod(os.path.join(fake, "scontrol"), 0o755)
        got = launch("launch_env; echo $LAUNCH_CPU_BIND $MASTER_ADDR", SLURM_GPUS_ON_NODE="8",
                     PATH=f"{fake}:{os.environ['PATH']}")
        assert got == f"{expected} gpu001", (plugin, got)
    # launch_srun passes the binding to srun.
    text = open(os.path.join(SLURM, "_launch.sh")).read()
    assert '"--cpu-bind=${LAUNCH_CPU_BIND:-none}"' in text
