"""SIGINT (Ctrl-C) and SIGTERM during a sweep: stop cleanly, keep everything finished, resume later.

While a sweep runs, both signals are caught in the driver:

- during the **trial stage**, the signal is passed on to Ray Tune as its own graceful stop (Tune's
  SIGUSR1 handler): Tune stops scheduling, saves its experiment state one last time and returns, so
  that ``Tuner.restore`` knows exactly which trials finished;
- anywhere else (extraction, analysis), a ``KeyboardInterrupt`` is raised in the main thread; Ray's
  blocking calls (``ray.wait``/``ray.get``) check for signals and raise it too. Feature sets already
  written stay in the store (writes are atomic), so a resume does not extract them again.

The runner then marks the parent run and any unfinished cell runs KILLED, records the sweep state as
interrupted, and raises ``SweepInterrupted`` (exit status 128 + signal number). A second signal while
it does so raises ``KeyboardInterrupt`` at once (the cleanup is cut short; a resume still works).

Tune's own SIGINT handler is switched off (``TUNE_DISABLE_SIGINT_HANDLER``) so that both signals take
this one path; Tune re-installs nothing else for SIGINT or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SweepSignals:
    """Context manager: catches SIGINT/SIGTERM in the main thread for the duration of a sweep.

    ``install()`` again after ``ray.init``, which sets its own SIGTERM handler (``sys.exit``)."""

    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.in_tune = False  # set by the runner around ``Tuner.fit``
        self._saved: dict[int, object] = {}
        self._saved_env: str | None = None
        self.active = threading.current_thread() is threading.main_thread()

    def start(self) -> SweepSignals:
        return self.__enter__()

    def stop(self) -> None:
        self.__exit__(None, None, None)

    def __enter__(self) -> SweepSignals:
        if self.active:
            self._saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
        if self.active:
            if self._saved_env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._saved_env

    def install(self) -> None:
        if not self.active:
            return
        for s in SIGNALS:
            current = signal.getsignal(s)
            if current != self._handle:
                self._saved.setdefault(s, current)
                signal.signal(s, self._handle)

    def restore(self) -> None:
        """Give the signals back to the handlers they had before the sweep."""
        for s, h in self._saved.items():
            signal.signal(s, h)
        self._saved.clear()

    @property
    def fired(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # a second signal: stop now, whatever the cleanup was doing
            raise KeyboardInterrupt
        self.signum = signum
        if self.in_tune:
            tune_stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
            if callable(tune_stop):  # Tune's graceful stop: a last experiment checkpoint, then fit() returns
                tune_stop(signal.SIGUSR1, frame)
                return
        raise KeyboardInterrupt
