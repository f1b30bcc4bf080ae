"""Claims: one job per config hash at a time, across sweeps that share a runs root (processes or hosts).

Before it runs, a job claims its config hash: ``<runs_root>/.claims/<config hash>.json``,
created atomically as a hard link to a complete file (``link`` fails when the name
exists, on NFS too), holding the holder's host, pid, start time and the record it
writes. The claim file's modification time is the heartbeat: a thread of the holder
touches it every ``timeout / 5`` seconds through the descriptor it keeps open, so a
claim that was taken over (renamed away) is never refreshed by its old holder.

Another job of the same config skips while the claim is live. A claim is stale when
its holder's process is gone (same host) or its heartbeat is older than
``claim_timeout`` seconds (any host: a node of a cluster that died); a stale claim
is taken over (renamed away: of several takers, one wins the rename) and the record
it points to is marked ``interrupted`` if it still says ``running``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fqbench.records import FINISHED, RECORD_NAME, iter_records, read_record, write_record
from fqbench.umask import apply_umask

CLAIMS_DIR = ".claims"
RUNNING = "running"
INTERRUPTED = "interrupted"
HOST = platform.node()

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, as its file says; ``heartbeat`` is the file's modification time."""

    host: str
    pid: int
    started_at: str
    record: str
    token: str
    heartbeat: float

    def describe(self) -> str:
        return (f"host {self.host} pid {self.pid} (started {self.started_at}, heartbeat "
                f"{max(0.0, time.time() - self.heartbeat):.0f} s ago, record {self.record})")

    def stale_reason(self, timeout: float) -> str | None:
        """Why this claim is stale, or None while its holder is alive."""
        if self.host == HOST and not pid_alive(self.pid):
            return f"its process {self.pid} on {self.host} is gone"
        age = time.time() - self.heartbeat
        if age > timeout:
            return f"no heartbeat for {age:.0f} s (claim_timeout={timeout:g} s)"
        return None


class Claim:
    """A claim this process holds; ``release()`` (or the ``with`` block's end) gives it up."""

    def __init__(self, path: Path, fd: int, holder: Holder, timeout: float):
        self.path, self.fd, self.holder = path, fd, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(timeout / 5,), daemon=True,
                                        name=f"claim-heartbeat-{path.stem}")
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                os.utime(self.fd)
            except OSError as error:  # keep beating: a shared filesystem may come back
                log.warning("claim %s: heartbeat failed (%s)", self.path, error)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:  # still ours, not taken over
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_path(runs_root: str | os.PathLike, config_hash: str) -> Path:
    return Path(runs_root) / CLAIMS_DIR / f"{config_hash}.json"


def claim(runs_root: str | os.PathLike, config_hash: str, record: str | os.PathLike, *,
          timeout: float) -> Claim | Holder:
    """Claim a config hash for the job writing ``record``: the ``Claim``, or the live ``Holder`` of someone else's."""
    path = claim_path(runs_root, config_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    mine = {"host": HOST, "pid": os.getpid(), "started_at": _now(), "record": str(Path(record).resolve()),
            "token": token}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{config_hash}.", suffix=".tmp")
    try:
        os.write(fd, json.dumps(mine).encode())
        os.fsync(fd)
        apply_umask(tmp)  # collaborators read the claims of a shared runs root
        for _ in range(10):  # each turn either wins, finds a live holder, or removes a stale claim
            try:
                os.link(tmp, path)
                return Claim(path, fd, Holder(heartbeat=time.time(), **mine), timeout)
            except FileExistsError:
                pass
            holder = read_holder(path)
            if holder is None:  # released (or taken over) between the link and the read
                continue
            reason = holder.stale_reason(timeout)
            if reason is None:
                os.close(fd)
                return holder
            _take_over(path, holder, reason)
        raise RuntimeError(f"could not claim {path}: it keeps changing hands")
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_holder(path: Path) -> Holder | None:
    """The holder a claim file names, or None when the file is gone."""
    try:
        with open(path) as f:
            heartbeat = os.fstat(f.fileno()).st_mtime
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise RuntimeError(f"claim file {path} is unreadable ({error}); delete it if no job of this config "
                           f"is running") from error
    return Holder(data["host"], int(data["pid"]), data["started_at"], data["record"], data["token"], heartbeat)


def _take_over(path: Path, holder: Holder, reason: str) -> None:
    """Remove a stale claim (one taker wins the rename) and mark its record interrupted."""
    aside = path.with_name(f".{path.stem}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another taker was first
    try:
        moved = read_holder(aside)
        if moved is not None and moved.token != holder.token:  # a fresh claim replaced the stale one meanwhile
            try:
                os.link(aside, path)
            except FileExistsError:
                log.warning("claim %s changed hands during a takeover; two jobs of this config may run", path)
            return
        log.warning("taking over the claim %s of %s: %s", path, holder.describe(), reason)
        mark_interrupted(holder.record, f"its job ({holder.host} pid {holder.pid}) stopped: {reason}")
    finally:
        aside.unlink(missing_ok=True)


def mark_interrupted(record: str | os.PathLike, reason: str) -> bool:
    """Mark a record that still says ``running`` as ``interrupted``; True when it did."""
    record = Path(record)
    try:
        data = read_record(record)
    except (OSError, ValueError):
        return False
    if data.get("status") != RUNNING:
        return False
    data.update(status=INTERRUPTED, error=f"interrupted: {reason}", interrupted_at=_now())
    write_record(record.parent, data)
    log.warning("marked %s interrupted: %s", record, reason)
    return True


def mark_stale_records(runs_root: str | os.PathLike, *, timeout: float) -> list[Path]:
    """Mark every ``running`` record under ``runs_root`` whose job is gone as ``interrupted``; returns them.

    A running job holds the claim of its config hash, naming its record; a running record whose
    claim is missing, stale, or names another record belongs to a job that died.
    """
    marked = []
    for path, record in iter_records(runs_root):
        if record.get("status") != RUNNING:
            continue
        holder = read_holder(claim_path(runs_root, str(record.get("config_hash"))))
        if holder is None:
            reason = "no job holds its config's claim (the job was killed)"
        elif _other_file(holder.record, path):
            reason = f"its config is now claimed by another job ({holder.describe()})"
        else:
            reason = holder.stale_reason(timeout)
        # read again: a job that finished meanwhile wrote its final record before releasing its claim
        if reason is not None and mark_interrupted(path, reason):
            marked.append(path)
    return marked


def _other_file(named: str, path: Path) -> bool:
    """Whether a claim's record is another file than ``path``; not when this host cannot tell (a runs root
    mounted elsewhere on the holder's host)."""
    try:
        return not os.path.samefile(named, path)
    except OSError:
        return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True



def keep_replaced_record(output_dir: str | os.PathLike, config_hash: str) -> None:
    """Before a job writes into ``output_dir``: never overwrite a finished record there silently.

    A finished record of the same config (``rerun=true``, or ``save=true`` adding the packed
    model) is kept as ``result.replaced-<time>.json`` (its ``packed`` folder likewise) with a
    warning; one of another config means two sweeps share one folder, which is refused.
    """
    directory = Path(output_dir)
    record = directory / RECORD_NAME
    try:
        old = read_record(record)
    except (OSError, ValueError):
        return
    if old.get("status") != FINISHED:
        return  # an unfinished try of a job is replaced by the next one
    if old.get("config_hash") != config_hash:
        raise FileExistsError(f"{record} is the finished record of another config ({old.get('config_hash')}); "
                              f"two sweeps write into one folder: give each its own hydra.sweep.dir (the default "
                              f"has a timestamp), or move that record away")
    stamp = "".join(c for c in str(old.get("finished_at") or _now()) if c.isalnum())
    kept = [directory / f"result.replaced-{stamp}.json"]
    os.replace(record, kept[0])
    if (directory / "packed").exists():
        kept.append(directory / f"packed.replaced-{stamp}")
        os.replace(directory / "packed", kept[1])
    log.warning("running config %s again into %s: its finished record is kept as %s", config_hash, directory,
                " and ".join(map(str, kept)))
