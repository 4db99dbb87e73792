"""One daemon per outbox: an exclusive ``flock`` on the pid file beside the outbox, held for the life of the
process that runs the daemon (one daemon, or the supervisor of ``workers = N``).

The pid file is the lock because it is what the daemon's state directory is known by: ``mediator reload``
and an operator's ``kill -HUP "$(cat var/mediator.pid)"`` find the daemon through it, and two daemons whose
outboxes share a directory would share it (and ``mediator.reload.json``) too. One lock per directory keeps
all of that to one owner. Taken before anything is built or bound, with ``LOCK_NB``: a second ``mediator
run`` on the same config exits at once, naming the running daemon's pid, and touches nothing of the first
(no port bound beside its SO_REUSEPORT listeners, no SQLite connection on its outbox, no pid file removed).

- The file is never unlinked, only emptied: unlinking a lock file lets a process that opened the old inode
  lock it while a newcomer locks a new one (two owners). An empty pid file means no daemon runs.
- The pid is written once the daemon handles its signals (``write_pid``), not when the lock is taken:
  ``mediator reload``'s SIGHUP before that would kill a process that is still importing. Until then the
  file is locked and empty, and a second ``run`` says a daemon is starting.
- The descriptor is opened ``O_CLOEXEC``, so nothing the daemon starts inherits it, except the workers of
  ``workers = N``, which the supervisor hands it on purpose (``pass_fds``): a ``flock`` belongs to the open
  file, so the lock stays held while any worker lives. A supervisor killed with SIGKILL leaves its workers
  draining on their outboxes for up to ``drain_timeout_s``; a new daemon must not open those outboxes
  meanwhile, and it is refused until the last worker has exited.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from mediator.core.errors import MediatorError


class AlreadyRunning(MediatorError):
    """Another process holds the lock: ``pid`` is what its pid file says (None while it starts)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        if pid is None:
            what = "another daemon is starting on this outbox"
        elif _alive(pid):
            what = f"a daemon is already running on this outbox (pid {pid})"
        else:
            what = f"the workers of daemon pid {pid} (which has exited) still run on this outbox"
        super().__init__(f"{what}: it holds the lock on {path}")


class DaemonLock:
    """The held lock (see the module docstring). ``acquire`` takes it or raises ``AlreadyRunning``;
    ``OSError`` when the file cannot be created (the outbox's directory is not writable)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, path: Path) -> DaemonLock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)  # what a daemon that was killed left there is not a running daemon's pid
        return cls(path, fd)

    def write_pid(self, pid: int | None = None) -> None:
        """Name this process (or ``pid``) as the running daemon."""
        data = f"{os.getpid() if pid is None else pid}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Empty the pid file and let go of the lock (closing the descriptor ends this process's hold;
        workers that inherited it keep it until they exit). Idempotent."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
