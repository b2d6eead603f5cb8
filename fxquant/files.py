"""Writing the user's files: whole or not at all, the replaced file's permissions kept, and errors
that name the user's path (never the temporary file beside it)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise an OSError that names ``what`` (the argument) unless ``path`` can be written.

    A read-only file is refused even though replacing it would succeed (the folder is writable):
    its mode says the user wants it kept. Checked before any work, so nothing runs in vain.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what}: {path} is a directory; give a file path (a new name inside it)")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: directory not found: {folder}; create it or choose another path")
    if os.path.exists(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if not mode & 0o222 or not os.access(path, os.W_OK):  # mode first: root passes os.access
            raise PermissionError(f"{what}: {path} is read-only (mode {mode:04o}); make it writable "
                                  "(chmod u+w) or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: cannot create files in {folder}; choose a writable directory")


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], what: str) -> None:
    """``write(tmp)`` into a private folder beside ``path``, then move the file into place.

    Same folder: the move is atomic (readers see the old file or the new one, whole). Same file
    name: torch uses it as the archive's root folder. A file that is replaced keeps its mode; a
    new one gets the usual permissions (the umask's), as open() gives.
    """
    path = os.fspath(path)
    check_writable(path, what)
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else None
    folder = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".fxquant-")
    tmp = os.path.join(folder, os.path.basename(path))
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as err:  # name the user's file: the temporary one is gone once this returns
        message = f"{what}: could not write {path}: {err.strerror or err}"
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err
    except RuntimeError as err:  # torch's archive writer names the file it was given
        if tmp not in str(err):
            raise
        raise RuntimeError(str(err).replace(tmp, path)) from err
    finally:
        shutil.rmtree(folder, ignore_errors=True)
