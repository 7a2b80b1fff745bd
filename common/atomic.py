"""Atomic file writes: nothing a reader can see is ever half written (DESIGN §6)."""
import contextlib
import json
import os
import tempfile


def _file_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # what open() would give; mkstemp alone gives 0600


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """A temporary file beside ``path``, renamed onto ``path`` when the block ends without error.

    The folder is created if needed. Until the rename, ``path`` keeps its previous content; an
    exception (or Ctrl-C) inside the block removes the temporary file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj, path):
    """``obj`` as indented JSON at ``path``, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
