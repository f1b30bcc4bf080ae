"""Modes that follow the umask for files created private by ``tempfile``.

``mkstemp`` creates 0600 files and ``mkdtemp`` 0700 folders whatever the umask, so
a record or checkpoint written through them and renamed into place would be
unreadable for collaborators on a shared runs folder. ``apply_umask`` gives them
the mode ``open``/``mkdir`` would have given (0666/0777 less the umask).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the kernel says it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file 0666 and a folder 0777, less the umask."""
    full = 0o777 if stat.S_ISDIR(os.stat(path).st_mode) else 0o666
    os.chmod(path, full & ~current_umask())
