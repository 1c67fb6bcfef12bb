"""Print the fault x outcome table after the session; with HEPTAPOD_FAULT_TABLE=FILE also write it there."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_terminal_summary(terminalreporter):
    from harness import TABLE, table_markdown

    if not TABLE:
        return
    text = table_markdown()
    terminalreporter.write_sep("=", "fault matrix")
    terminalreporter.write_line(text)
    out = os.environ.get("HEPTAPOD_FAULT_TABLE")
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
