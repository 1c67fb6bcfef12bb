"""Progress bars and peak-memory reports of the conversion commands (``cli`` and ``writer_cli`` use them;
a module of its own so that neither command module imports the other's internals)."""
from __future__ import annotations

from typing import Optional


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shard", dynamic_ncols=True, disable=None)


class _AnonPeak:
    """Peak anonymous memory (``RssAnon``) of this process, sampled by a thread: ``ru_maxrss`` also counts
    the pages of memory-mapped checkpoint files, which the kernel drops under pressure."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def sample(self) -> None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
        except OSError:
            pass

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()


_ANON: Optional[_AnonPeak] = None


def _peak_rss_mib() -> str:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if _ANON is None:
        return f"{rss:.0f} MiB"
    _ANON.sample()
    return f"{rss:.0f} MiB (anonymous {_ANON.peak_kib / 1024.0:.0f} MiB)"


def start_peak_sampler() -> None:
    """Start sampling the anonymous memory of this process once (for :func:`_peak_rss_mib`)."""
    global _ANON
    if _ANON is None:
        _ANON = _AnonPeak()
