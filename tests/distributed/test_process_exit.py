"""exit_process: the Python-level shut-down runs (threads joined, atexit handlers, streams flushed), the
status is the one given, and nothing after it runs."""
import subprocess
import sys

PROBE = r"""
import atexit, sys, threading, time
from heptapod_ds.distributed.process_exit import exit_process
done = []
def worker():
    time.sleep(0.3)
    done.append(1)
threading.Thread(target=worker).start()
atexit.register(lambda: print("atexit ran; worker finished:", bool(done), flush=True))
sys.stdout.write("buffered line without a newline flush")
exit_process(CODE)
print("not reached")
"""


def _run(code: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.replace("CODE", str(code))], capture_output=True, text=True,
                          timeout=120)


def test_exit_process_runs_the_python_shutdown_and_keeps_the_status():
    for code in (0, 75):
        out = _run(code)
        assert out.returncode == code, out.stderr
        assert "buffered line without a newline flush" in out.stdout
        assert "atexit ran; worker finished: True" in out.stdout
        assert "not reached" not in out.stdout
