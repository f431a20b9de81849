"""One training job per run directory.

The lock file is written whole under a private name and then hard-linked to `train.lock`: link() fails
when the target exists, atomically on local disks and on the shared filesystems multi-node jobs use (NFS,
Lustre, GPFS), where flock may be unreliable or absent. A job that loses the race therefore always reads a
complete record, never a file created but not yet written. The record holds the owner's host, PID, start
time, a random token and a heartbeat that a background thread refreshes.
A lock whose owner is gone is taken over with a warning: on the same host, when its PID no longer exists
(a kill -9, a crash of the machine's job); on any host, when its heartbeat is older than `stale_after`.
The takeover renames the stale file aside first, so two jobs that find the same stale lock cannot both win.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOCK_NAME = "train.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0  # 20 missed heartbeats: far beyond a pause for a checkpoint or a slow filesystem


class RunLockError(RuntimeError):
    """The run directory is owned by another training job (or this job lost its lock)."""


class RunLock:
    """The ownership lock of one run directory: `with RunLock(run_dir): ...`, or acquire() / release()."""

    def __init__(self, run_dir: str | Path, heartbeat: float = HEARTBEAT_SECONDS,
                 stale_after: float = STALE_AFTER_SECONDS):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.token = secrets.token_hex(8)
        self.lost: str | None = None  # set by the heartbeat thread when another job has taken the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_dir = False

    def acquire(self) -> RunLock:
        self._made_dir = not self.path.parent.exists()  # a start that fails early leaves no empty run directory
        self.path.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        for _ in range(3):  # a takeover, then the create again; a third round only if another job raced us
            try:
                self._create(started)
            except FileExistsError:
                holder = read_lock(self.path)
                reason = self.stale_reason(holder)
                if reason is None:
                    raise RunLockError(f"{self.path.parent} is in use by another training job: {describe(holder)} "
                                       f"(lock file {self.path}). Wait for it, stop it, or use another run name; "
                                       f"a lock whose job is gone is taken over automatically.") from None
                try:  # only one of several jobs that found the same stale lock renames it
                    os.rename(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{self.token}"))
                except FileNotFoundError:
                    continue
                warnings.warn(f"taking over the lock of {self.path.parent} from a job that is gone ({reason}): "
                              f"{describe(holder)}", stacklevel=2)
                self.path.with_name(f"{LOCK_NAME}.stale-{self.token}").unlink(missing_ok=True)
                continue
            self._started = started
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise RunLockError(f"could not take the lock {self.path}: other jobs kept taking it")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if read_lock(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)
            if self._made_dir and not any(self.path.parent.iterdir()):
                try:
                    self.path.parent.rmdir()
                except OSError:  # another job's start wrote into it meanwhile
                    pass

    def check(self) -> None:
        """Raise if another job has taken this job's lock (e.g. after this process was suspended for long)."""
        if self.lost is not None:
            raise RunLockError(self.lost)

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the holder's lock may be taken over, or None while its job may still be running."""
        age = time.time() - float(holder.get("heartbeat", 0.0))
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return f"PID {holder['pid']} no longer exists on this host"
            return None if age <= self.stale_after else f"no heartbeat for {age:.0f} s"
        if not holder:  # unreadable: a job killed between creating and writing it; judge by the file's age
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "it disappeared"
        return None if age <= self.stale_after else f"no heartbeat for {age:.0f} s"

    def _create(self, started: float) -> None:
        """Make the lock file, complete, or raise FileExistsError if another job holds one."""
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.token}.tmp")
        with open(tmp, "w") as f:
            json.dump(self._record(started), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: exclusive create, then write (a brief empty file)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(started), f)
                f.flush()
                os.fsync(f.fileno())
        finally:
            tmp.unlink(missing_ok=True)

    def _record(self, started: float) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "heartbeat": time.time(),
                "token": self.token}

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            holder = read_lock(self.path)
            if holder.get("token") != self.token:
                self.lost = (f"the lock {self.path} was taken by another job ({describe(holder)}) while this one "
                             "ran: its heartbeat must have stalled; stopping so that the two do not mix")
                return
            tmp = self.path.with_name(f"{LOCK_NAME}.{self.token}.tmp")
            tmp.write_text(json.dumps(self._record(self._started)))
            os.replace(tmp, self.path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_lock(path: Path) -> dict[str, Any]:
    """The lock's record, or {} when it is missing or not (yet) readable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a job whose lock file is empty or unreadable"
    started = datetime.fromtimestamp(float(holder.get("started", 0)), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"PID {holder.get('pid')} on {holder.get('host')}, started {started}, last heartbeat {age:.0f} s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
