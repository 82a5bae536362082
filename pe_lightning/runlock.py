"""One live process per run and stage: `runs/<run>/<stage>/lock`, held with flock(2) while the stage runs.

The kernel drops a flock when its process dies, kill -9 included, so a lock left by a killed process is
free for the next command at once: no pid guessing, no stale-lock clean-up. The file's one line says who
holds it and how far it got (`pid step total_steps`), for `status` and for the message that refuses a
second process.

Only the launching process locks (global rank 0 of node 0): the other ranks of a DDP run, started by it or
by torchrun, share the run by design.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pe_lightning.errors import UserError

LOCK_NAME = "lock"
_LINE = 64  # the lock's text is rewritten in place at one fixed width: a reader never sees it half-written
_HELD_FDS: set[int] = set()  # this process's lock descriptors


def _drop_held_fds_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file, and a flock lasts until every
    descriptor of it is closed: a worker outliving its killed trainer for a few seconds would keep the run
    locked. The child closes its copies; the parent's lock is untouched."""
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_drop_held_fds_in_child)


class RunLocked(UserError, RuntimeError):
    """Another live process holds this run and stage."""


@dataclass(frozen=True)
class Holder:
    pid: int
    step: int
    total_steps: int

    def describe(self) -> str:
        if not self.total_steps:  # still building the stage or its data
            return f"pid {self.pid}, starting"
        return f"pid {self.pid}, step {self.step} of {self.total_steps}"


def launches_the_run() -> bool:
    """True in the process that owns the run's files: global rank 0 on node 0 (or a plain single process)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    node = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    return getattr(rank_zero_only, "rank", 0) == 0 and node == "0"


def holder(stage_root: Path) -> Optional[Holder]:
    """Who holds the stage's lock now, or None when no live process does (no file, or a dead holder's)."""
    path = Path(stage_root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its text says by whom
            return _parse(os.pread(fd, _LINE, 0).decode(errors="replace"))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _parse(text: str) -> Holder:
    fields = [int(f) for f in text.split() if f.isdigit()][:3]
    pid, step, total = fields + [0] * (3 - len(fields))
    return Holder(pid, step, total)


class StageLock:
    """`with StageLock(root): ...` holds the stage for this process, or raises RunLocked."""

    def __init__(self, stage_root: Path, wait_s: float = 1.0):
        self.root = Path(stage_root)
        self.path = self.root / LOCK_NAME
        self.total_steps = 0  # known once the stage is built (LockProgress sets it)
        self.wait_s = wait_s  # `status` takes a shared lock for an instant: a starter retries past it
        self._fd: Optional[int] = None

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "StageLock":
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise RunLocked(self._refusal()) from None
            if self._still_linked(fd):  # not a file a releasing holder unlinked after we opened it
                break
            os.close(fd)
        self._fd = fd
        _HELD_FDS.add(fd)
        self.update(0)
        return self

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _refusal(self) -> str:
        return _refusal(self.root, holder(self.root))

    def update(self, step: int) -> None:
        """Record this process's step (called every few steps by progress.LockProgress)."""
        if self._fd is not None:
            line = f"{os.getpid()} {int(step)} {self.total_steps}".ljust(_LINE - 1) + "\n"
            os.pwrite(self._fd, line.encode(), 0)

    def release(self) -> None:
        """Unlink, then unlock: a process that opened the file meanwhile sees it unlinked and retries."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            _HELD_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def refuse_if_held(stage_root: Path) -> None:
    """Fail at once, before the slow imports of a training start, when a live process holds the stage (the
    lock itself is taken later, by the stage manager: this is only the early, cheap answer)."""
    who = holder(stage_root)
    if who is not None:
        raise RunLocked(_refusal(Path(stage_root), who))


def _refusal(root: Path, who: Optional[Holder]) -> str:
    by = who.describe() if who else "another process"
    pid = who.pid if who else "PID"
    return (f"{root} is being trained by another process ({by}); one process per run and stage. "
            f"Wait for it, or stop it (kill {pid}) and rerun this command to resume.")
