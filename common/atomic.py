"""Atomic file writes: nothing a reader can see is ever half written (``docs/formats.md``).

A file is written to a temporary file beside it, ``.<name>.<host>-<pid>.<random>.tmp``, and
renamed into place. A process killed mid-write leaves that temporary behind;
``remove_stale_temporaries`` deletes the ones whose writer is gone when a stage starts.
"""
import contextlib
import json
import os
import re
import socket
import tempfile

from common.errors import UserError


def _file_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # what open() would give; mkstemp alone gives 0600
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


class WriteError(UserError):
    """A file could not be written (no space left, a read-only or vanished folder, ...): one line
    saying what, where, and that the file's previous version is intact."""


def write_error(path, err):
    """The ``WriteError`` for ``OSError`` ``err`` raised while ``path`` was being written."""
    folder = os.path.dirname(os.path.abspath(path))
    reason = err.strerror or str(err)
    if not os.path.isdir(folder):
        kept = f"its folder {folder} no longer exists"
    elif os.path.exists(path):
        kept = "the previous version there is intact"
    else:
        kept = "nothing was written there"
    return WriteError(f"could not write {path}: {reason}; {kept}")


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """A temporary file beside ``path``, renamed onto ``path`` when the block ends without error.

    The folder is created if needed. Until the rename, ``path`` keeps its previous content; an
    exception (or Ctrl-C) inside the block removes the temporary file, and an ``OSError`` while
    writing (a full disk, a read-only or vanished folder) becomes a ``WriteError``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{_HOST}-{os.getpid()}.", suffix=".tmp",
                                   dir=folder)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(err, OSError):
            raise write_error(path, err) from None
        raise


def write_json(obj, path):
    """``obj`` as indented JSON at ``path``, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def remove_stale_temporaries(folder):
    """Delete the temporaries ``atomic_open`` left in ``folder`` (not below it) when their writer,
    a process of this machine, no longer runs; returns how many were removed.

    A temporary of a live process (another stage writing into the same folder) or of another
    machine (a shared file system) is left alone.
    """
    removed = 0
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = _TEMPORARY.match(name)
        if match and match["host"] == _HOST and not _alive(int(match["pid"])):
            try:
                os.remove(os.path.join(folder, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
