"""One driver per output directory: an exclusive lock held for the life of the driver process.

Every ``rayjobs.*`` job takes it before it writes anything (``rayjobs.common.parse_args``).
On a local (or NFS) directory it is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
``<output-dir>/.selfcorrect.lock``: the kernel drops it when the holder dies, however it dies,
so a driver killed with SIGKILL leaves nothing that blocks the next run, which takes the lock
over. The file records the holder (pid, host, job, start time, command line) so a refused
driver can name it; a clean exit empties the file, so leftover contents mean the previous
holder was killed. The file itself is never deleted (deleting a lock file opens a window in
which two processes lock two different files of one name).

Object stores have no such lock: there the job says so in one line and goes on, and the user
must not start two drivers on one URI.

Within one process the lock is reentrant: the pipeline runs stage functions in-process
(possibly from several threads), and a second ``acquire`` of a directory this process already
holds is a no-op. A forked child does not inherit it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from selfcorrect import io

LOCK_NAME = ".selfcorrect.lock"

_held: dict[str, int] = {}  # real path of a lock file this process holds -> its descriptor
_guard = threading.Lock()


class OutputDirBusy(RuntimeError):
    """Another live process holds the output directory's lock."""

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def lock_path(output_dir: str) -> str:
    return os.path.join(output_dir, LOCK_NAME)


def job_name() -> str:
    """``rayjobs.pipeline`` for ``python -m rayjobs.pipeline``; else the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    arg0 = sys.argv[0] if sys.argv else ""
    return f"python {arg0}" if arg0 in ("", "-c") else os.path.basename(arg0)


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 1234 on host h (rayjobs.pipeline, since 22:10:03)``."""
    started = holder.get("started")
    since = ""
    if isinstance(started, (int, float)):
        fmt = "%H:%M:%S" if time.time() - started < 20 * 3600 else "%Y-%m-%d %H:%M:%S"
        since = f", since {time.strftime(fmt, time.localtime(started))}"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"({holder.get('job', '?')}{since})"
    )


def _read_holder(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 65536, 0)
    if not raw.strip():
        return {}
    try:
        holder = json.loads(raw)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def acquire(output_dir: str) -> str | None:
    """Take ``output_dir``'s lock for the rest of this process (creating the directory).

    Returns a line worth printing, or None: the note that an object store gets no lock, or
    that a killed driver's lock was taken over. Raises ``OutputDirBusy`` (its message names
    the holder and the lock file) when another live process holds it.
    """
    if io.is_uri(output_dir):
        return (
            f"[lock] {output_dir} is on an object store, where no run lock can be taken: "
            "do not start a second driver on this output dir while this one runs"
        )
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    path = lock_path(output_dir)
    key = os.path.realpath(path)
    with _guard:
        if key in _held:
            return None  # this process already holds it (pipeline -> stage, or a thread)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_of_busy(fd)
            os.close(fd)
            who = describe_holder(holder) if holder else "another process (not yet recorded)"
            raise OutputDirBusy(
                f"output dir {output_dir} is in use by {who}, which holds {path}; wait for it "
                "to finish or use another --output-dir",
                holder,
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            return (
                f"[lock] the filesystem of {output_dir} cannot lock files ({e.strerror}): "
                "do not start a second driver on this output dir while this one runs"
            )
        previous = _read_holder(fd)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "job": job_name(),
            "started": time.time(),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        _held[key] = fd
        _register_hooks()
    if previous:
        return (
            f"[lock] took over the lock of {output_dir} from {describe_holder(previous)}, "
            "which ended without releasing it (killed?)"
        )
    return None


def _holder_of_busy(fd: int, wait_s: float = 2.0) -> dict[str, Any]:
    """The recorded holder; a holder that has just locked may not have written it yet."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = _read_holder(fd)
        if holder or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)


def held(output_dir: str) -> bool:
    """Whether this process holds ``output_dir``'s lock."""
    return os.path.realpath(lock_path(output_dir)) in _held


def release(output_dir: str) -> None:
    """Give the lock back (empties the file: nobody holds it). Normally done at exit."""
    with _guard:
        fd = _held.pop(os.path.realpath(lock_path(output_dir)), None)
        if fd is not None:
            _unlock(fd)


def release_all() -> None:
    with _guard:
        fds = list(_held.values())
        _held.clear()
        for fd in fds:
            _unlock(fd)


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # still locked here: no one can read a half-emptied record
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


_hooks_registered = False


def _register_hooks() -> None:
    global _hooks_registered
    if _hooks_registered:
        return
    _hooks_registered = True
    atexit.register(release_all)
    os.register_at_fork(after_in_child=_forget_in_child)


def _forget_in_child() -> None:
    """A forked child closes its copies without unlocking (that would unlock the parent too):
    the lock stays the parent's and ends with it, not with its longest-lived child."""
    global _guard
    _guard = threading.Lock()  # another thread of the parent may have held it at the fork
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()
