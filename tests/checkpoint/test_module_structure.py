"""heptapod_ds.checkpoint's command modules import in one direction: cli -> writer_cli -> progress/writer/...,
never back (they used to import each other's helpers)."""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "heptapod_ds",
                   "checkpoint")


def _imports(name):
    tree = ast.parse(open(os.path.join(PKG, f"{name}.py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module or "")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("heptapod_ds.checkpoint."):
            found.add(node.module.rsplit(".", 1)[1])
    return found


def test_no_import_cycle_between_the_command_modules():
    graph = {name[:-3]: _imports(name[:-3]) for name in os.listdir(PKG) if name.endswith(".py")}
    assert "writer_cli" in graph["cli"] and "cli" not in graph["writer_cli"]

    def reach(start, seen):
        for nxt in graph.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    cycles = [m for m in graph if m in reach(m, set())]
    assert not cycles, f"modules of heptapod_ds.checkpoint that import themselves through others: {cycles}"


def test_the_progress_helpers_work_from_both_commands():
    from heptapod_ds.checkpoint import cli, progress, writer_cli  # noqa: F401 - both import cleanly

    progress.start_peak_sampler()
    assert "MiB (anonymous" in progress._peak_rss_mib()
