"""One error policy: what the user can fix is a ``UserError``; everything else is a bug.

A ``UserError`` says what is wrong in the user's input or surroundings (a spec key, a data file, a
weights file, the storage path, the tracking server, a patient in two splits) and what to do about it,
in one message. The command line prints that message alone, without a traceback, and exits with status
2; any other exception keeps its traceback and asks to be reported (``dinoscale.cli``).

The existing error classes of the package are user errors of one kind each and keep their names and
modules (``SpecError`` in ``dinoscale.spec``, ``DataError`` in ``dinoscale.data``, ``WeightsError`` in
``dinoscale.models``, ...); this module holds the base class, the kinds that have no other home
(storage, tracking), the interruption of a sweep, and ``user_error_of``, which finds the user's error
again inside the wrappers of Ray tasks and Ray Tune trials.

A leaf: it imports nothing of dinoscale (and not Ray), so every module may raise these.
"""

from __future__ import annotations

import signal

EXIT_USER_ERROR = 2  # the user's input (spec, data, weights, storage, tracking): fix it and run again
EXIT_CRASH = 1  # a bug (or, for `sweep`, cells that failed for a reason other than the user's input)


class UserError(Exception):
    """A problem the user can fix; ``str(e)`` names the key, file, folder or URI and what to do.

    Subclasses set ``kind`` (the word printed before the message). Keep the constructor to one message
    argument: these errors cross process boundaries (Ray pickles them) and must arrive whole."""

    kind = "input"


class StorageError(UserError, OSError):
    """The storage path (feature store, Tune state, sweep state) is not a writable folder."""

    kind = "storage"


class TrackingError(UserError, ConnectionError):
    """The MLflow tracking store cannot be reached or written."""

    kind = "tracking"


class SweepInterrupted(KeyboardInterrupt):
    """A sweep stopped by SIGINT (Ctrl-C) or SIGTERM after it saved what it had; ``--resume`` continues it.

    A ``KeyboardInterrupt`` so that no ``except Exception`` on the way swallows it (Ray and Tune included).
    The exit status is the shell's convention for a signal: 128 + the signal number (130 SIGINT, 143 SIGTERM),
    so a scheduler sees an interruption, not a bad input (2) or a crash (1)."""

    def __init__(self, signum: int, message: str):
        super().__init__(signum, message)
        self.signum = signum
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    def __str__(self) -> str:
        return self.message


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def user_error_of(exc: BaseException | None, _depth: int = 0) -> UserError | None:
    """The user's error behind ``exc``: itself, or the original one inside a Ray / Ray Tune wrapper.

    Ray re-raises a task's exception on the driver as a ``RayTaskError`` that also subclasses the original
    class, but whose ``str`` is the remote traceback; the original instance is its ``cause``. Ray Tune
    keeps a trial's exception the same way (``TuneError`` / ``RayTaskError``). Found by attribute, so that
    this leaf does not import Ray."""
    if exc is None or _depth > 8:
        return None
    for inner in (getattr(exc, "cause", None), exc.__cause__):
        if isinstance(inner, BaseException) and inner is not exc:
            found = user_error_of(inner, _depth + 1)
            if found is not None:
                return found
    if isinstance(exc, UserError) and type(exc).__module__.split(".")[0] != "ray":
        return exc
    return None


def describe(exc: UserError) -> str:
    """The one line (or block) printed for a user error: its kind, then its message."""
    return f"{exc.kind} error: {exc}"
