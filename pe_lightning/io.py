"""Atomic writes: a reader (or a resumed run) sees the old file or the new one, never a torn one.

Each write goes to a temporary file in the same folder, is flushed and fsync'ed, then `os.replace`d into
place, and the folder is fsync'ed so the rename itself survives a power cut. Used by exports, checkpoints,
`progress.json`, `DONE` and the teacher caches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]

__all__ = ["crash_point", "fsync_dir", "write_atomic", "write_text_atomic", "write_bytes_atomic", "torch_save_atomic",
           "replace_dir_atomic"]


_renames_seen = 0


def crash_point() -> None:
    """Crash injection for the kill soak (tests/kill_soak.py): with PE_KILL_AT_RENAME=N in the environment, the
    N-th atomic rename of this process SIGKILLs it just before renaming (the temporary file complete, the target
    untouched), the moment a crash is likeliest to leave a torn state. Called before every rename that
    publishes a file or folder: checkpoints, exports, DONE, progress.json, the teacher caches. Unset, it costs
    one environment lookup."""
    global _renames_seen
    at = os.environ.get("PE_KILL_AT_RENAME")
    if at:
        _renames_seen += 1
        if _renames_seen == int(at):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: PathLike) -> None:
    """fsync a folder (makes a rename inside it durable); a no-op where the OS does not allow it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(handle)` on a temporary file beside `path`, fsync it, and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are shared files
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        crash_point()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    return write_atomic(path, lambda handle: handle.write(text), mode="w")


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda handle: handle.write(data))


def torch_save_atomic(obj: Any, path: PathLike) -> Path:
    import torch

    return write_atomic(path, lambda handle: torch.save(obj, handle))


def replace_dir_atomic(build: Callable[[Path], None], target: PathLike) -> Path:
    """Build a folder with `build(tmp_dir)` beside `target`, then swap it into place.

    The new folder is complete before the swap; a kill during the swap leaves either the old folder, or no
    folder and a complete `<target>.tmp` (taken by the next call: it is rebuilt from scratch)."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    for child in tmp.rglob("*"):
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(tmp)
    crash_point()
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        crash_point()  # between the two renames: no target, a complete tmp
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)
    return target
