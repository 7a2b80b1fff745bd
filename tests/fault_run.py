"""Run one of the scripts as a user would, with a write fault injected: a test helper.

    python -m tests.fault_run FAULT NAME NTH SCRIPT [ARGS ...]      (from the repository root)

The ``NTH`` file (1 = the first) whose name contains ``NAME`` and that is written through a
temporary file fails: ``enospc`` raises ``OSError(ENOSPC)`` half way through its first write
(a full disk), ``erofs`` raises ``OSError(EROFS)`` when its temporary file is created (a
read-only folder), ``vanish`` deletes the file's folder during its first write (a folder that
disappeared). Everything else runs as ``python SCRIPT ARGS``.
"""
import errno
import os
import runpy
import shutil
import sys
import tempfile

FAULT, NAME, NTH, SCRIPT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
_seen = {"count": 0}
_real_mkstemp, _real_fdopen = tempfile.mkstemp, os.fdopen


def _hit(prefix):
    if NAME not in (prefix or ""):
        return False
    _seen["count"] += 1
    return _seen["count"] == NTH


class _FailingFile:
    """A file whose first write writes half its data, then fails."""

    def __init__(self, f, folder):
        self._f, self._folder, self._failed = f, folder, False

    def write(self, data):
        if self._failed:
            return self._f.write(data)
        self._failed = True
        self._f.write(data[:len(data) // 2])
        self._f.flush()
        if FAULT == "vanish":
            shutil.rmtree(self._folder)
            return len(data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _mkstemp(suffix=None, prefix=None, dir=None, text=False):
    fd, path = _real_mkstemp(suffix, prefix, dir, text)
    if _hit(prefix):
        if FAULT == "erofs":
            os.close(fd)
            os.remove(path)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        _failing.add(fd)
    return fd, path


def _fdopen(fd, *args, **kwargs):
    f = _real_fdopen(fd, *args, **kwargs)
    if fd in _failing:
        _failing.discard(fd)
        return _FailingFile(f, os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")))
    return f


_failing = set()
tempfile.mkstemp, os.fdopen = _mkstemp, _fdopen
sys.argv = [SCRIPT, *sys.argv[5:]]
runpy.run_path(SCRIPT, run_name="__main__")
