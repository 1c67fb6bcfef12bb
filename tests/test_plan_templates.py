"""The Slurm templates' micro batch and recompute setting are the planner's choice for 80 GB GPUs with 15%
headroom, and the README's tables are the planner's output: regenerate both and fail on drift."""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = {"B": "train_b.sh", "L": "train_l.sh", "XL": "train_xl.sh", "H": "train_h.sh"}


def _template(name):
    text = open(os.path.join(REPO, "slurm", name)).read()
    knobs = dict(re.findall(r'(\w+)="\$\{\1:-([^}]*)\}"', text))
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, flags=re.M).group(1))
    exec_line = next(line for line in text.splitlines() if line.startswith("exec "))
    recompute = re.search(r"recompute\.granularity=(\w+)", exec_line)
    return knobs, nodes, recompute.group(1) if recompute else "none"


@pytest.mark.parametrize("preset", list(TEMPLATES))
def test_templates_are_sized_by_the_planner(preset):
    from heptapod_ds.cost.plan import template_defaults

    want = template_defaults()[preset]
    knobs, nodes, recompute = _template(TEMPLATES[preset])
    assert (nodes, int(knobs["TP"]), int(knobs["ZERO"])) == (want["nodes"], want["tp"], want["zero"])
    assert int(knobs["MICRO_BATCH"]) == want["micro_batch"], (
        f"{TEMPLATES[preset]}: MICRO_BATCH={knobs['MICRO_BATCH']}, the planner chooses {want['micro_batch']}")
    assert recompute == want["recompute"]


def test_readme_tables_are_the_planners_output():
    from heptapod_ds.cost.plan import fit_table, template_defaults

    readme = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"<!-- fit-table[^>]*-->\n(.*?)\n<!-- /fit-table -->", readme, flags=re.S)
    assert block, "README lost its fit-table markers"
    assert block.group(1).strip() == fit_table().strip(), "README 'Will it fit?' table is stale: regenerate it"
    for preset, d in template_defaults().items():
        row = (f"| `{TEMPLATES[preset]}` | {preset} | {d['nodes']} x 8 | {d['tp']} | 1 | {d['zero']} | "
               f"{d['micro_batch']} | {d['dp']} | {d['grad_accum']} |")
        assert row in readme, f"README defaults row stale; expected {row}"
