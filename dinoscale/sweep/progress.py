"""Progress of the extraction stage, from the Ray tasks to the driver's display.

The driver's display (a rich ``Live`` on a terminal) never crosses into Ray: what a task holds is a
handle to a small counter actor (``ProgressCounter``, no CPU of its own), which it tells how many rows
it has written (``CountingWriter``, a thin wrapper around the store's shard writer, reporting at most
twice a second). The driver polls the counter while it waits for the tasks and draws the bar.

A leaf (imports nothing of dinoscale and not Ray): the counter's class is shipped to a worker by
reference, and importing this module there costs nothing.
"""

from __future__ import annotations

import time


class ProgressCounter:
    """Rows extracted so far, per job label (an actor on the cluster; a plain object in tests)."""

    def __init__(self):
        self.rows: dict[str, int] = {}

    def add(self, job: str, n: int) -> None:
        self.rows[job] = self.rows.get(job, 0) + int(n)

    def reset(self, job: str) -> None:
        """A retried task starts its job again: its earlier count would be counted twice."""
        self.rows[job] = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.rows)


class CountingWriter:
    """The store's shard writer, counting the rows it is given and reporting them to the counter actor
    (fire and forget; at most every ``interval`` seconds, and once more at the end of the shard)."""

    def __init__(self, writer, counter, job: str, interval: float = 0.5):
        self._writer, self._counter, self._job, self._interval = writer, counter, job, interval
        self._pending, self._last = 0, time.monotonic()

    def write(self, rows, values) -> None:
        self._writer.write(rows, values)
        self._pending += len(rows)
        if time.monotonic() - self._last >= self._interval:
            self.flush()

    def flush(self) -> None:
        if self._pending and self._counter is not None:
            self._counter.add.remote(self._job, self._pending)
        self._pending, self._last = 0, time.monotonic()

    def __getattr__(self, name):  # extra, bytes, close, abort...: the writer's own
        return getattr(self._writer, name)
