"""Peak resident memory of this process over a stretch of work (an extraction task, a trial).

Linux keeps the peak resident set (``VmHWM``) per process; writing ``5`` to ``/proc/self/clear_refs`` resets
it to the current resident set, so the peak of one task can be read even in a reused worker process.
Elsewhere (or when the reset is refused) the lifetime peak from ``getrusage`` is reported, marked as such.
A leaf module: it imports nothing from dinoscale.
"""

from __future__ import annotations

import re
import resource
import sys


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def current_rss() -> int | None:
    return _status("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's peak resident set of this process to its current one; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The process's peak resident set since the last ``reset_peak`` (else since it started)."""
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.bytes``: the peak resident set during the block
    (``p.since_start``: True when it could only be measured since the process started)."""

    def __enter__(self) -> PeakRSS:
        self.since_start = not reset_peak()
        self.bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = peak_rss()
