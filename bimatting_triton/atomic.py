"""Writing a file atomically: a new temporary file beside it, flushed to disk, then renamed.

A crash (or Ctrl-C, or a full disk) part way leaves the old file, or none, never a truncated
file that looks complete. The temporary file is created exclusively (``O_EXCL``, a random
name), so two writers never share one.
"""
from __future__ import annotations

import os
import secrets

import torch

__all__ = ["check_output_file", "create_temp_beside", "torch_save_atomically"]


def check_output_file(path: str | os.PathLike, name: str = "path") -> str:
    """``path`` as a str, or an ``IsADirectoryError`` naming ``name`` when it is (or is written
    as) a folder: checked before any work, instead of failing at the final rename."""
    path = os.fspath(path)
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise IsADirectoryError(f"{name} {path!r} is a folder, expected a file name")
    return path


def create_temp_beside(path: str, mode: int = 0o666) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder, opened for writing: ``(fd, name)``.

    Created with ``mode`` less the umask by the kernel: with ``0o666`` it gets the
    permissions of any new file, where ``mkstemp``'s 0600 would make it private (and
    reading the umask means changing it, process-wide, for a moment).
    """
    folder, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path!r}")


def torch_save_atomically(obj: object, path: str) -> None:
    """``torch.save(obj, path)``, atomically. A new file gets the permissions of a plainly
    created one (``0o666`` less the umask), a replaced file keeps its own. Errors of the file
    system (a folder that is not writable, a full disk) name the file."""
    try:  # a replaced file keeps its permissions (from the start: its contents may be private)
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    fd, tmp = create_temp_beside(path, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        if mode is not None:
            os.chmod(tmp, mode)  # exactly, past the umask
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
