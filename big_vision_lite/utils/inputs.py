"""Checks of the paths a user gives: text files to read, files and folders to write.

Each check raises one `ValueError` (or `FileNotFoundError`) whose message names the option or file at fault and
what is expected, so the CLI prints it as one line. Output paths are checked before a long run starts, so its
results are never lost to a path that turns out unwritable at the end.
"""

import os
import tempfile
from pathlib import Path


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of `path`; `what` names it in errors (e.g. "--prompt-file")."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, expected a text file")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():  # reading a FIFO would wait for a writer forever
        raise ValueError(f"{what} {path} is not a regular file (a FIFO or device), expected a text file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start}); save the file as UTF-8") from None


def _first_existing_non_dir(path: Path) -> Path | None:
    """The first ancestor of `path` (itself excluded) that exists but is not a folder, if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _check_can_create_in(folder: Path, what: str, path: Path) -> None:
    """Refuses with one line unless `folder` (or the nearest existing folder above it, where the missing ones would
    be created) can take a new file: a probe file is created there and removed. Nothing else is created."""
    blocker = _first_existing_non_dir(path)
    if blocker is not None:
        raise ValueError(f"{what} {path}: {blocker} is a file, not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        fd, probe = tempfile.mkstemp(prefix=".bvl-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {existing} ({e.strerror or e})") from None


def check_output_file(path: str | Path, what: str) -> Path:
    """`path` as a file that can be written (its missing folders can be created); refused when it is a folder or
    its folder cannot hold a new file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, expected a file path")
    if path.exists() and not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file (a FIFO or device); expected a file path")
    _check_can_create_in(path.parent, what, path)
    return path


def check_output_dir(path: str | Path, what: str) -> Path:
    """`path` as a folder that can be written (it can be created if missing); refused when it is a file."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, expected a folder")
    _check_can_create_in(path, what, path)
    return path
