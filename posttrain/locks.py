"""File locks that survive a killed holder: who runs a stage or a sweep run, across workers.

    lock = FileLock(Path("sweep/locks/run-a.lock"))
    if lock.try_acquire():
        try: ...          # the work
        finally: lock.release()

A lock is a file created with O_CREAT | O_EXCL (atomic on local file systems and NFSv3+)
holding the holder's pid, host name and a start time; a thread touches it every `beat` seconds
while it is held (the heartbeat is the file's mtime). A lock is stale, and may be taken over,
when its holder is on this host and its pid is gone (kill -9), or when its heartbeat is older
than `stale_after` seconds (a holder on another machine that died). Taking a stale lock over
goes through a short-lived breaker file, so two workers that both see it stale cannot both
remove it and then remove each other's new lock. Used by posttrain/pipeline/store.py and sweep.py;
tested in tests/test_sweep.py.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class FileLock:
    def __init__(self, path: str | os.PathLike, stale_after: float = 120.0, beat: float = 10.0):
        self.path = Path(path)
        self.stale_after, self.beat = stale_after, beat
        self._stop: threading.Event | None = None

    def holder(self) -> dict | None:
        """The holder's {pid, host, since}, or None when the lock is free (or unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        info = self.holder()
        if info is None:  # created but not yet written: stale only once its heartbeat is old
            return age > self.stale_after
        if info.get("host") == HOST and not _pid_alive(int(info.get("pid", -1))):
            return True
        return age > self.stale_after

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            return True
        if self.is_stale() and self._break():
            return self._create()
        return False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": HOST, "since": time.time()}, f)
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True).start()
        return True

    def _break(self) -> bool:
        """Remove a stale lock, under a breaker file so only one worker does it."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a breaker left by a worker killed in these few lines
                if time.time() - breaker.stat().st_mtime > self.stale_after:
                    breaker.unlink()
            except FileNotFoundError:
                pass
            return False
        os.close(fd)
        try:
            if self.is_stale():  # still stale now that only we may break it
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            breaker.unlink(missing_ok=True)

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.beat):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            info = self.holder()
            if info and info.get("pid") == os.getpid() and info.get("host") == HOST:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def wait_for(done, lock: FileLock, poll: float = 2.0):
    """Block until `done()` is true or `lock` can be taken; True when we hold the lock."""
    while True:
        if done():
            return False
        if lock.try_acquire():
            if done():  # finished by the other holder just before it let go
                lock.release()
                return False
            return True
        time.sleep(poll)
