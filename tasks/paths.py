"""What is wrong with a path a user gave, said precisely: missing, a symbolic-link loop, a FIFO, a device.

``Path.is_file()`` answers False for all of these alike, so "the file does not exist" used to be said of
a named pipe or a link loop too. A FIFO must never be opened here: ``open`` blocks until a writer comes.

    from tasks.paths import file_problem
    file_problem(Path("data.npz"))   # None, or "is a named pipe (FIFO), not a regular file"
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def file_problem(path: Path, folder_ok: bool = False) -> str | None:
    """Why ``path`` is not a regular file trtflow can read (stat only, nothing is opened), or None.

    Args:
        path: the path as given (``~`` is expanded).
        folder_ok: a folder is fine (a dataset may be a folder of .npy files).

    Returns:
        A phrase to follow the path, e.g. "does not exist" or "is a symbolic link loop"; None when usable.
    """
    path = Path(path).expanduser()
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop (the links point at each other, so no file is ever reached)"
        if exc.errno == errno.ENOENT:
            if os.path.islink(path):
                return f"is a symbolic link to {os.readlink(path)}, which does not exist"
            return "does not exist"
        if exc.errno == errno.ENOTDIR:
            return "does not exist (a part of the path is a file, not a folder)"
        return f"cannot be read ({exc.strerror})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return None if folder_ok else "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file: trtflow reads a dataset several times and memory-maps it"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"
