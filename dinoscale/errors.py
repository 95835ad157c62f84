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

import errno
import os
import re
import shlex
import shutil
import signal
import sys

EXIT_USER_ERROR = 2  # the user's input (spec, data, weights, storage, tracking): fix it and run again
EXIT_CRASH = 1  # a bug (or, for `sweep`, cells that failed for a reason other than the user's input)


class UserError(Exception):
    """A problem the user can fix; ``str(e)`` names the key, file, folder or URI and what to do.

    Subclasses set ``kind`` (the word printed before the message). Keep the constructor to one message
    argument: these errors cross process boundaries (Ray pickles them) and must arrive whole."""

    kind = "input"


class StorageError(UserError, OSError):
    """The storage path (feature store, Tune state, sweep state) is not a writable folder, is full, or went away.

    ``reason`` (``full``, ``read-only``, ``permission``, ``vanished``; empty when not a failure of the machine's
    storage) and ``path`` (the file or folder being written) are set by ``environment_error``: attributes survive
    Ray's pickling (``OSError.__reduce__`` keeps ``__dict__``)."""

    kind = "storage"
    reason = ""
    path = ""
    code: int | None = None  # the errno behind it
    resumable = False  # set by the sweep when it stopped on this error after it started: `--resume` continues


class TrackingError(UserError, ConnectionError):
    """The MLflow tracking store cannot be reached or written."""

    kind = "tracking"
    resumable = False  # as for ``StorageError``


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


def user_error_of(exc: BaseException | None) -> UserError | None:
    """The user's error behind ``exc``: itself, or the original one inside a Ray / Ray Tune wrapper; failing
    that, a failure of the machine's storage in its chain (a full disk, a read-only mount: ``environment_error``).

    Ray re-raises a task's exception on the driver as a ``RayTaskError`` that also subclasses the original
    class, but whose ``str`` is the remote traceback; the original instance is its ``cause``. Ray Tune
    keeps a trial's exception the same way (``TuneError`` / ``RayTaskError``). Found by attribute, so that
    this leaf does not import Ray. A ``UserError`` anywhere in the chain wins over a bare ``OSError`` (a
    check that raised ``StorageError(...) from e`` says more than ``e``)."""
    return _find(exc, _own_user_error) or _find(exc, _storage_failure)


def _own_user_error(exc: BaseException) -> UserError | None:
    if isinstance(exc, UserError) and type(exc).__module__.split(".")[0] != "ray":
        return exc
    return None


def _storage_failure(exc: BaseException) -> UserError | None:
    if isinstance(exc, OSError) and type(exc).__module__.split(".")[0] != "ray":
        return environment_error(exc)  # a full disk, a read-only mount, a permission: the machine, not a bug
    return None


def _find(exc: BaseException | None, pick, _depth: int = 0) -> UserError | None:
    """``pick`` of the innermost exception in ``exc``'s chain (Ray's ``cause``, then ``__cause__``) that has one."""
    if exc is None or _depth > 8:
        return None
    for inner in (getattr(exc, "cause", None), exc.__cause__):
        if isinstance(inner, BaseException) and inner is not exc:
            found = _find(inner, pick, _depth + 1)
            if found is not None:
                return found
    return pick(exc)


# ---------------------------------------------------------------- the machine's storage

# errno -> (reason, what the system says): failures of the storage a user fixes (free space, a writable mount,
# permissions), not bugs. ENOENT is one only where the storage root itself is gone: ``environment_error(root=)``.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: ("full", "no space left on device"),
    errno.EDQUOT: ("full", "disk quota exceeded"),
    errno.EROFS: ("read-only", "read-only file system"),
    errno.EACCES: ("permission", "permission denied"),
}
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)  # pyarrow's and fsspec's OSErrors carry it in the text


def os_errno(exc: BaseException) -> int | None:
    """The errno of an ``OSError``: its attribute, else the ``[Errno N]`` in its text (pyarrow's file system)."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    found = _ERRNO_IN_TEXT.search(str(exc))
    return int(found.group(1)) if found else None


def size_text(n: float) -> str:
    """Bytes as a person reads them: 812 KiB, 3.4 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{int(n)} B"


def free_space(path: str | os.PathLike) -> tuple[int, int] | None:
    """(free, total) bytes of the file system holding ``path`` (its nearest existing folder); None if unknown."""
    p = os.path.abspath(os.fspath(path))
    while p and not os.path.isdir(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return None
    return usage.free, usage.total


def environment_error(
    exc: BaseException,
    path: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    needed: int = 0,
    needed_by: str = "",
) -> StorageError | None:
    """``exc`` as one ``StorageError`` when it is a failure of the machine's storage - full (ENOSPC, EDQUOT),
    read-only (EROFS), not permitted (EACCES), or the storage root ``root`` gone (ENOENT while it no longer
    exists) - naming the file being written (``path``, else the error's own file name), the free space of its
    file system, and ``needed`` bytes when known (``needed_by``: what needs them). None for any other error (a
    bug keeps its traceback)."""
    if isinstance(exc, StorageError):
        return exc
    if not isinstance(exc, OSError):
        return None
    code = os_errno(exc)
    where = os.fspath(path or getattr(exc, "filename", None) or root or "")
    if code == errno.ENOENT and root is not None and not os.path.isdir(root):
        err = StorageError(
            f"the storage path '{root}' disappeared while writing '{where}' (removed, or its file system unmounted); "
            "restore it (or mount it again) and make sure nothing else removes it"
        )
        err.reason, err.path, err.code = "vanished", where, code
        return err
    if code not in ENVIRONMENT_ERRNOS:
        return None
    reason, says = ENVIRONMENT_ERRNOS[code]
    verb = "writing" if path is not None else "at"  # the store names the file it writes; elsewhere, the error's file
    what = f"{says} ({errno.errorcode[code]})" + (f" {verb} '{where}'" if where else "")
    elsewhere = "set storage.path (or DINOSCALE_STORAGE) to"
    if reason == "full":
        usage = free_space(where or root) if (where or root) else None  # no path: no file system to tell
        room = f"{size_text(usage[0])} free of {size_text(usage[1])} on its file system" if usage else ""
        need = (
            (f"{needed_by} need ~{size_text(needed)}" if needed_by else f"{size_text(needed)} needed") if needed else ""
        )
        detail = ", ".join(x for x in (need, room) if x)
        fix = f"free space there, or {elsewhere} a larger file system"
        message = f"{what}{f' ({detail})' if detail else ''}; {fix}"
    elif reason == "read-only":
        message = f"{what}: the file system is mounted read-only; mount it writable" + (
            f", or {elsewhere} a writable folder" if path is not None or root is not None else ""
        )
    else:
        message = f"{what}: this user may not access it; fix its permissions" + (
            f", or {elsewhere} a folder you can write" if path is not None or root is not None else ""
        )
    err = StorageError(message)
    err.reason, err.path, err.code = reason, where, code
    return err


def resume_command(command: str, spec) -> str:
    """The command that continues a stopped sweep: the command line as typed (its overrides and options
    included, so the spec's digest matches) with ``--resume``, else ``dinoscale <command> SPEC --resume``."""
    args = sys.argv[1:]
    if args[:1] == [command]:
        return "dinoscale " + shlex.join(args + ([] if "--resume" in args else ["--resume"]))
    return f"dinoscale {command} {shlex.quote(str(spec or 'SPEC'))} --resume"


def describe(exc: UserError) -> str:
    """The one line (or block) printed for a user error: its kind, then its message."""
    return f"{exc.kind} error: {exc}"
