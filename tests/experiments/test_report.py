"""The report from run directories as the trainer leaves them: aggregation over seeds, scores at equal
FLOPs, plots, and hand-written text around the generated block kept on regeneration."""
import json
import os

import pytest

from heptapod_ds.experiments import load_grid
from heptapod_ds.experiments.plots import plot_scores
from heptapod_ds.experiments.report import BEGIN, END, render, write_report
from heptapod_ds.experiments.results import collect, equal_flops_budget


def _fake_run(run_dir, steps, flops_per_step, cc, fd, wall):
    """What train.py leaves: evaluation records in metrics.jsonl and summary.json."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for i, s in enumerate(steps):
            fh.write(json.dumps({"step": s, "loss": 1.0}) + "\n")
            fh.write(json.dumps({"step": s, "eval_samples": 100, "images_seen": 16 * s,
                                 "train_flops": flops_per_step * s, "class_consistency": cc[i],
                                 "frechet_distance": fd[i]}) + "\n")
        fh.write('{"step": 99, "eval_samples": ')  # cut short by a crash: ignored
    with open(os.path.join(run_dir, "summary.json"), "w") as fh:
        json.dump({"steps": steps[-1], "class_consistency": cc[-1], "frechet_distance": fd[-1],
                   "train_flops": flops_per_step * steps[-1], "train_wall_s": wall}, fh)
    with open(os.path.join(run_dir, "ablate_run.json"), "w") as fh:
        json.dump({"attempts": [{"rc": 0, "wall_s": wall + 5}]}, fh)


@pytest.fixture
def grid_with_results(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: fake\nseeds: [0, 1]\nvariants:\n  cheap: {head.type: next}\n  dear: {head.type: global}\n")
    grid = load_grid(str(path))
    specs = grid.runs(str(tmp_path / "out"))
    by = {s.name: s for s in specs}
    _fake_run(by["cheap/seed0"].run_dir, [10, 20], 1.0, [0.2, 0.6], [3.0, 1.0], 10)
    _fake_run(by["cheap/seed1"].run_dir, [10, 20], 1.0, [0.4, 0.8], [2.0, 2.0], 30)
    _fake_run(by["dear/seed0"].run_dir, [10, 20], 3.0, [0.5, 0.7], [1.5, 0.5], 50)
    # dear/seed1 never ran
    return grid, specs, tmp_path


def test_aggregation_over_seeds_and_equal_flops(grid_with_results):
    grid, specs, _ = grid_with_results
    cheap, dear = collect(specs, grid.variants_as_strings())
    assert [r.spec.name for r in cheap.runs] == ["cheap/seed0", "cheap/seed1"]
    final = cheap.stat("final", "class_consistency")
    assert final.mean == pytest.approx(0.7) and final.std == pytest.approx(0.1414213, rel=1e-5) and final.n == 2
    assert cheap.stat("best", "frechet_distance").mean == pytest.approx(1.5)  # min per seed: 1.0 and 2.0
    assert len(dear.done_runs) == 1 and dear.stat("final", "class_consistency").std is None
    budget = equal_flops_budget([cheap, dear])
    assert budget == pytest.approx(20.0)  # cheap's final budget; dear reached 60
    # dear at 20 FLOPs: between its evaluations at 10 steps (30 FLOPs) -> none below: n/a;
    assert dear.at_flops("class_consistency", budget) is None
    assert cheap.at_flops("class_consistency", 15.0).mean == pytest.approx((0.4 + 0.6) / 2)
    assert dear.at_flops("class_consistency", 45.0).mean == pytest.approx(0.6)


def test_report_table_plots_and_kept_text(grid_with_results):
    grid, specs, tmp = grid_with_results
    variants = collect(specs, grid.variants_as_strings())
    plots = plot_scores(variants, str(tmp / "plots"), grid.name)
    assert sorted(os.path.basename(p) for p in plots.values()) == [
        "class_consistency_vs_flops.png", "class_consistency_vs_steps.png",
        "frechet_distance_vs_flops.png", "frechet_distance_vs_steps.png"]
    for p in plots.values():
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 10_000
    report = str(tmp / "report.md")
    write_report(report, render(grid, variants, plots, report, quick=False, out_dir=str(tmp / "out")), "T")
    text = open(report).read()
    assert "| `cheap` | `head.type=next` | 2/2 | 20 | 20 | 0.700 ± 0.141 |" in text
    assert "| `dear/seed1` | not run |" in text
    assert "](plots/class_consistency_vs_flops.png)" in text
    # Hand-written reading around the block survives a regeneration.
    with open(report, "w") as fh:
        fh.write("# Mine\n\nintro\n\n" + text[text.index(BEGIN):text.index(END) + len(END)] + "\n\nmy reading\n")
    write_report(report, render(grid, variants, plots, report, quick=False, out_dir=str(tmp / "out")), "T")
    again = open(report).read()
    assert again.startswith("# Mine\n\nintro\n\n" + BEGIN) and again.endswith(END + "\n\nmy reading\n")
    assert again.count(BEGIN) == 1
