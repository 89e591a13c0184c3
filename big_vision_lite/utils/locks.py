"""An exclusive lock on a folder, held by one process at a time, that a killed holder does not leave stuck.

`folder_lock(W)` takes an advisory `fcntl.flock` on `W/.lock` and writes the holder's process id into it. The
kernel releases the lock when the holder exits for any reason (`kill -9` included), so a stale `.lock` file is
harmless: the next process simply takes it. Another process asking for a held lock either gets `FolderInUseError`
naming the holder (`wait=False`: two `bvl train` runs on one workdir) or waits for it (`wait=True`: a run that
needs a shared run another process is training).
"""

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class FolderInUseError(ValueError):
    """The folder's lock is held by another process."""


def _holder(lock_path: Path) -> str:
    try:
        pid = lock_path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid else "another process"


# Locks this process holds, by the lock file's (device, inode): flock does not nest within one process (a second
# descriptor of the same file would wait for the first forever), so a second request is refused instead.
_HELD: set[tuple[int, int]] = set()


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, what: str = "workdir", wait: bool = False) -> Iterator[Path]:
    """Holds the exclusive lock of `folder` (created if missing) for the `with` block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    stat = os.fstat(fd)
    key = (stat.st_dev, stat.st_ino)
    if key in _HELD:
        os.close(fd)
        raise FolderInUseError(f"{what} {folder} is already in use by this very run: a run cannot train in (or "
                               "require a run in) its own workdir; give the required run another workdir")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise FolderInUseError(f"{what} {folder} is in use by {_holder(lock_path)} (its lock {lock_path}); "
                                       "wait for it to finish or stop it") from None
            print(f"{what} {folder} is in use by {_holder(lock_path)}; waiting for it", file=sys.stderr)
            started = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            print(f"{what} {folder}: lock acquired after {time.monotonic() - started:.0f} s", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(key)
        yield folder
    finally:
        _HELD.discard(key)
        os.close(fd)  # releases the lock; the file stays (removing it would race with a process opening it)
