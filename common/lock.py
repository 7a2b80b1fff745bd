"""One run per output folder (``docs/formats.md``, "Locks").

A stage that writes into a folder holds ``<folder>/.lock`` for its whole run: an exclusive
``flock`` on the file, which also holds who took it (process id, host, start time, command). A
second run on the same folder is refused at once with one line naming the holder. The kernel
releases a ``flock`` when its process ends, however it ends, so a lock left by a killed run
(``kill -9``) is free: the next run takes it over and says so. Where the file system offers no
``flock``, the holder's process id is checked instead (on the same host).
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

from common.errors import UserError

LOCK_NAME = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder_text(holder):
    if not holder:
        return "another process"
    return (f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command')})")


def _read_holder(fd):
    """The holder record in the lock file ``fd``, or None when it is empty or unreadable."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def _flock(fd, path):
    """True if this process now holds the ``flock`` of ``fd``, False if another process does,
    None when the file system has no ``flock``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in _NO_FLOCK:
            return None
        raise


def _same_file(fd, path):
    """Whether ``path`` still names the file open as ``fd`` (a releasing run unlinks it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _take(path):
    """An open fd of ``path`` that this process holds, and the earlier holder it replaces (or None)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        held = _flock(fd, path)
        holder = _read_holder(fd)
        if held is None:  # no flock here: a live process id on this host holds the lock
            held = holder is None or (holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")))
        if not held:
            os.close(fd)
            raise UserError(f"{os.path.dirname(path)} is in use by {_holder_text(holder)}; one run writes into a "
                            "folder at a time: wait for it to end, stop it, or give another folder")
        if _same_file(fd, path):
            return fd, holder
        os.close(fd)  # taken from a run that was releasing it: try the new file


@contextlib.contextmanager
def folder_lock(folder, enabled=True, log=print):
    """Hold ``folder``'s lock (creating the folder) while the block runs; ``enabled=False`` (a
    rank other than 0 under torchrun) holds nothing.

    A folder held by a live process is a ``UserError`` naming it; a lock whose holder is gone is
    taken over with one ``log`` line. The lock file is removed when the block ends, and a folder
    the lock created is removed again if nothing was written into it.
    """
    if not enabled:
        yield None
        return
    created = not os.path.isdir(folder)
    path = os.path.join(folder, LOCK_NAME)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, earlier = _take(path)
    except OSError as err:
        raise UserError(f"cannot take the lock {path}: {err.strerror}") from None
    try:
        if earlier and earlier.get("pid") != os.getpid():
            log(f"note: {path} was left by {_holder_text(earlier)}, which no longer runs; taking it over")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty


@contextlib.contextmanager
def exclusive(folder):
    """A short critical section over ``folder`` (an exclusive ``flock`` on the folder itself,
    waiting for it): serialises read-modify-write updates of a file shared by several runs."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # no flock on this file system: run unserialised
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
