"""Write faults injected into a script's run: a test helper.

``injected(fault, name, nth)``: while its ``with`` block runs, the ``NTH`` file (1 = the first)
whose name contains ``NAME`` and that is written through a temporary file fails: ``enospc`` raises ``OSError(ENOSPC)`` half way through its first write
(a full disk), ``erofs`` raises ``OSError(EROFS)`` when its temporary file is created (a
read-only folder), ``vanish`` deletes the file's folder during its first write (a folder that
disappeared); everything else is written as usual. ``tests/cli_cases.py`` runs a script's
command line under one (``{"argv": [...], "fault": [FAULT, NAME, NTH]}``).
"""
import contextlib
import errno
import os
import shutil
import tempfile

_real_mkstemp, _real_fdopen = tempfile.mkstemp, os.fdopen


class _Fault:
    """Which write fails, and how: ``FAULT``, ``NAME``, ``NTH`` above, and the writes seen so far."""

    def __init__(self, fault, name, nth):
        self.fault, self.name, self.nth, self.count, self.failing = fault, name, int(nth), 0, set()

    def hit(self, prefix):
        if self.name not in (prefix or ""):
            return False
        self.count += 1
        return self.count == self.nth


_active = []  # the fault in force (at most one)


class _FailingFile:
    """A file whose first write writes half its data, then fails."""

    def __init__(self, f, folder, fault):
        self._f, self._folder, self._fault, self._failed = f, folder, fault, False

    def write(self, data):
        if self._failed:
            return self._f.write(data)
        self._failed = True
        self._f.write(data[:len(data) // 2])
        self._f.flush()
        if self._fault == "vanish":
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
    fault = _active[0] if _active else None
    if fault is not None and fault.hit(prefix):
        if fault.fault == "erofs":
            os.close(fd)
            os.remove(path)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        fault.failing.add(fd)
    return fd, path


def _fdopen(fd, *args, **kwargs):
    f = _real_fdopen(fd, *args, **kwargs)
    fault = _active[0] if _active else None
    if fault is not None and fd in fault.failing:
        fault.failing.discard(fd)
        return _FailingFile(f, os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")), fault.fault)
    return f


@contextlib.contextmanager
def injected(fault, name, nth):
    """The ``nth`` write of a file named like ``name`` fails by ``fault`` while the block runs."""
    _active.append(_Fault(fault, name, nth))
    tempfile.mkstemp, os.fdopen = _mkstemp, _fdopen
    try:
        yield
    finally:
        _active.clear()
        tempfile.mkstemp, os.fdopen = _real_mkstemp, _real_fdopen

