"""The grid file: parsing, expansion into runs, early errors, stale run directories."""
import json
import os

import pytest

from heptapod_ds.experiments import GridError, load_grid
from heptapod_ds.experiments.grid import check_runs
from heptapod_ds.experiments.runner import check_not_stale, run_state, train_command

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _write(tmp_path, text, name="g.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_expansion_order_overrides_and_quick(tmp_path):
    grid = load_grid(os.path.join(HERE, "tiny_grid.yaml"), ["logging.log_every=2"])
    runs = grid.runs(str(tmp_path))
    assert [r.name for r in runs] == ["next_tiny/seed0", "next_tiny/seed1", "global_tiny/seed0", "global_tiny/seed1"]
    o = runs[3].override_dict()
    assert o["head.type"] == "global" and o["train.steps"] == "400" and o["logging.log_every"] == "2"
    assert o["train.seed"] == "1" and o["data.seed"] == "1"
    assert runs[3].run_dir == os.path.join(str(tmp_path), "global_tiny", "seed1")
    quick = grid.runs(str(tmp_path), quick=True)
    assert [r.name for r in quick] == ["next_tiny/seed0", "global_tiny/seed0"]  # first seed only
    assert quick[0].override_dict()["train.steps"] == "20"
    cfgs = check_runs(quick)
    assert cfgs["global_tiny/seed0"].head.timesteps == 2 and cfgs["next_tiny/seed0"].head.type == "next"
    cmd = train_command(quick[0], ["python"])
    assert cmd[1].endswith(os.path.join("heptapod_ds", "train.py")) and f"run_dir={quick[0].run_dir}" in cmd


def test_nested_overrides_and_seed_restriction(tmp_path):
    grid = load_grid(_write(tmp_path, "seeds: [3, 5]\nvariants:\n  g: {head: {type: global, timesteps: 2}}\n"))
    assert grid.name == "g"
    grid.restrict_seeds([5])
    (run,) = grid.runs(str(tmp_path))
    assert run.override_dict()["head.timesteps"] == "2" and run.seed == 5
    with pytest.raises(GridError, match="seeds are"):
        grid.restrict_seeds([7])


@pytest.mark.parametrize("text, match", [
    ("variants: {}\n", "'variants' must map"),
    ("variants:\n  a: {head.typo: next}\n", "unknown config key 'head.typo'"),
    ("variants:\n  a: {head.type: nxt}\n", "run a/seed0: .*head.type='nxt'"),
    ("variants:\n  a: {run_dir: x}\n", "own directory"),
    ("variants:\n  a: {train.seed: 3}\n", "list the seeds"),
    ("seeds: [1, 1]\nvariants:\n  a: {}\n", "repeat"),
    ("seeds: [-1]\nvariants:\n  a: {}\n", "integers >= 0"),
    ("variants:\n  a b: {}\n", "variant name 'a b'"),
    ("bogus: 1\nvariants:\n  a: {}\n", "unknown top-level key"),
    ("variants:\n  a: [1]\n", "expected a mapping"),
    ("variants:\n  a: {head.type: [1, 2]}\n", "numbers, strings"),
])
def test_bad_grids_fail_before_any_run(tmp_path, text, match):
    with pytest.raises(GridError, match=match):
        grid = load_grid(_write(tmp_path, text))
        check_runs(grid.runs(str(tmp_path / "out")))


def test_changed_grid_refuses_the_old_run_directory(tmp_path):
    grid = load_grid(_write(tmp_path, "variants:\n  a: {head.type: next}\n"))
    (run,) = grid.runs(str(tmp_path / "out"))
    assert run_state(run) == "new"
    check_not_stale(run)  # nothing there yet
    os.makedirs(run.run_dir)
    with open(os.path.join(run.run_dir, "ablate_run.json"), "w") as fh:
        json.dump({"variant": "a", "seed": 0, "overrides": ["head.type=global", *run.overrides[1:]],
                   "attempts": []}, fh)
    with pytest.raises(GridError, match="head.type: global -> next"):
        check_not_stale(run)
    (tmp_path / "out" / "a" / "seed0" / "summary.json").write_text("{}")
    assert run_state(run) == "done"
