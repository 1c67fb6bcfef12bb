"""An exclusive lock on a pretokenize output, so that two jobs never write the same beton.

``flock`` on ``FILE.beton.lock``: the kernel releases it when the holder dies, so a crashed job
never leaves a stale lock behind. The file records who holds it, for the error message.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional


class OutputLockedError(RuntimeError):
    """Another pretokenize job holds the lock on this output."""


class OutputLock:
    def __init__(self, output: str, wait_s: float = 0.0):
        self.path = output + ".lock"
        self.wait_s = wait_s
        self._fh: Optional[object] = None

    def acquire(self) -> "OutputLock":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fh = open(self.path, "a+")
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "unknown holder"
                    fh.close()
                    raise OutputLockedError(
                        f"another pretokenize job holds the lock {self.path} ({holder}); wait for it to finish, "
                        f"or stop it, or choose another --output.") from None
                time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
