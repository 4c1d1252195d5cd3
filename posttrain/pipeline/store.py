"""Stage folders keyed by their settings: run a stage once, skip it when done, share it in sweeps.

    python -c "from posttrain.pipeline.store import StageRunner; help(StageRunner)"

A stage's settings (its config plus the digests of the stages it reads) hash to a digest. A
finished stage holds `done.json` (settings, digest, wall time) and is skipped next time. In a
run folder (`posttrain run`) the stage lives at OUT/NAME and other settings for a finished stage
are an error. With a `store` (`posttrain sweep`) it lives at STORE/NAME-DIGEST, shared by every
run whose settings lead to it, and OUT/NAME is a relative symlink to it. Either way a stage is
computed under a lock (posttrain/locks.py): a second worker that needs the same stage waits for
it instead of computing it twice (or, with `wait=False`, raises StageBusy so a sweep worker can
take another run meanwhile), and takes it over when the first worker was killed (the stages
resume inside: sampling keeps finished rows, training its checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from posttrain.config import ConfigError
from posttrain.locks import FileLock, wait_for
from posttrain.names import check_path_name
from posttrain.records import write_json


class StageBusy(Exception):
    """A stage this run needs is being computed by another live worker."""


def digest_of(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class StageRunner:
    """`runner(name, settings, fn)` -> (folder, digest); fn(folder) runs when not done yet."""

    def __init__(
        self,
        out: Path,
        store: Path | None = None,
        stale_after: float = 120.0,
        poll: float = 2.0,
        wait: bool = True,
    ):
        self.out, self.store = Path(out), (Path(store) if store else None)
        self.stale_after, self.poll, self.wait = stale_after, poll, wait
        self.times: dict[str, tuple[float, bool]] = {}  # stage -> (seconds, skipped)

    def folder(self, name: str, digest: str) -> Path:
        if self.store is None:
            return self.out / name
        return self.store / f"{name.replace('/', '-')}-{digest}"

    def __call__(self, name: str, settings: dict, fn) -> tuple[Path, str]:
        check_path_name("stage name", name)  # OUT/NAME must stay inside OUT
        digest = digest_of(settings)
        folder = self.folder(name, digest)
        marker = folder / "done.json"
        if self.store is not None:
            self._link(name, folder)

        def done() -> bool:
            if not marker.exists():
                return False
            found = json.loads(marker.read_text())
            if found["settings_hash"] != digest:
                raise ConfigError(
                    f"{marker}: stage '{name}' finished earlier with other settings; "
                    f"use a new --out folder or delete {folder}"
                )
            self.times[name] = (found["seconds"], True)
            return True

        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder.with_name(folder.name + ".lock"), self.stale_after)
        if not self._acquire(done, lock, name):
            print(f"[{name}] done earlier ({self.times[name][0]:.0f} s): skipped", flush=True)
            return folder, digest
        try:
            print(f"[{name}] running ...", flush=True)
            start = time.time()
            fn(folder)
            seconds = time.time() - start
            write_json(marker, {"settings": settings, "settings_hash": digest, "seconds": seconds})
        finally:
            lock.release()
        self.times[name] = (seconds, False)
        return folder, digest

    def _acquire(self, done, lock: FileLock, name: str) -> bool:
        """True when we hold the stage's lock and must compute it; False when it is done."""
        if self.wait:
            return wait_for(done, lock, self.poll)
        if done():
            return False
        if not lock.try_acquire():
            raise StageBusy(f"stage '{name}' is being computed by another worker")
        if done():  # finished by the other holder just before it let go
            lock.release()
            return False
        return True

    def _link(self, name: str, folder: Path) -> None:
        link = self.out / name
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(folder, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            return
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise ConfigError(f"{link}: exists and is not a link to a shared stage")
        tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
