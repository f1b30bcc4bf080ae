"""Claims on config hashes: live claims make others skip, stale ones are taken over, dead jobs' records interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fqbench.claims import HOST, Claim, Holder, claim, claim_path, mark_stale_records
from fqbench.records import read_record, write_record

REPO = Path(__file__).resolve().parents[1]


def running_record(directory: Path, digest="h1") -> Path:
    return write_record(directory, {"status": "running", "config_hash": digest, "started_at": "t"})


def forge_claim(root: Path, digest: str, record: Path, *, host=HOST, pid=None, age=0.0) -> Path:
    """A claim file as another job would have left it, its heartbeat ``age`` seconds old."""
    path = claim_path(root, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid or os.getpid(), "started_at": "t",
                                "record": str(record.resolve()), "token": "forged"}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_live_claim_makes_another_job_skip_until_released(tmp_path):
    mine = claim(tmp_path, "h1", tmp_path / "a" / "result.json", timeout=60)
    assert isinstance(mine, Claim)
    other = claim(tmp_path, "h1", tmp_path / "b" / "result.json", timeout=60)
    assert isinstance(other, Holder) and other.pid == os.getpid() and other.record.endswith("a/result.json")
    assert f"pid {os.getpid()}" in other.describe()
    assert isinstance(claim(tmp_path, "h2", tmp_path / "c" / "result.json", timeout=60), Claim)  # another hash
    mine.release()
    assert not claim_path(tmp_path, "h1").exists()
    with claim(tmp_path, "h1", tmp_path / "b" / "result.json", timeout=60) as again:
        assert isinstance(again, Claim)
    assert sorted(p.name for p in claim_path(tmp_path, "h1").parent.iterdir()) == ["h2.json"]  # no temporary left


def test_the_heartbeat_refreshes_the_claim(tmp_path):
    with claim(tmp_path, "h1", tmp_path / "a" / "result.json", timeout=2):
        path = claim_path(tmp_path, "h1")
        os.utime(path, (0, 0))  # as if its last beat were in 1970
        deadline = time.monotonic() + 30
        while path.stat().st_mtime == 0 and time.monotonic() < deadline:  # a beat every timeout / 5 = 0.4 s
            time.sleep(0.05)
        assert path.stat().st_mtime > 0
        assert isinstance(claim(tmp_path, "h1", tmp_path / "b" / "result.json", timeout=2), Holder)


def test_a_killed_job_s_claim_is_taken_over_and_its_record_interrupted(tmp_path):
    record = tmp_path / "killed" / "result.json"
    script = (f"import time\nfrom fqbench.claims import claim\nfrom fqbench.records import write_record\n"
              f"held = claim({str(tmp_path)!r}, 'h1', {str(record)!r}, timeout=600)\n"
              f"write_record({str(record.parent)!r}, {{'status': 'running', 'config_hash': 'h1'}})\n"
              f"print('running', flush=True)\ntime.sleep(600)\n")
    job = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().strip() == "running"
        assert isinstance(claim(tmp_path, "h1", tmp_path / "new" / "result.json", timeout=600), Holder)  # alive
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert read_record(record)["status"] == "running"  # killed mid-run: nothing could say otherwise
    taken = claim(tmp_path, "h1", tmp_path / "new" / "result.json", timeout=600)
    assert isinstance(taken, Claim)
    taken.release()
    killed = read_record(record)
    assert killed["status"] == "interrupted" and f"pid {job.pid}" in killed["error"] and "gone" in killed["error"]


def test_a_claim_without_heartbeat_is_taken_over_from_another_host(tmp_path):
    record = running_record(tmp_path / "old")
    forge_claim(tmp_path, "h1", record, host="node-that-died", pid=1, age=30)
    assert isinstance(claim(tmp_path, "h1", tmp_path / "new" / "result.json", timeout=60), Holder)  # 30 s < 60 s
    assert read_record(record)["status"] == "running"
    taken = claim(tmp_path, "h1", tmp_path / "new" / "result.json", timeout=10)
    assert isinstance(taken, Claim)
    taken.release()
    assert read_record(record)["status"] == "interrupted" and "no heartbeat" in read_record(record)["error"]


def test_stale_running_records_are_marked_interrupted(tmp_path):
    orphan = running_record(tmp_path / "orphan", "h1")  # killed, its claim gone (or never made)
    live = running_record(tmp_path / "live", "h2")
    forge_claim(tmp_path, "h2", live)
    dead = running_record(tmp_path / "dead", "h3")
    forge_claim(tmp_path, "h3", dead, host="node-that-died", age=3600)
    superseded = running_record(tmp_path / "superseded", "h2")  # h2's claim names another record
    write_record(tmp_path / "done", {"status": "ok", "config_hash": "h4"})
    marked = mark_stale_records(tmp_path, timeout=600)
    assert sorted(p.parent.name for p in marked) == ["dead", "orphan", "superseded"]
    assert read_record(live)["status"] == "running" and read_record(tmp_path / "done" / "result.json")["status"] == "ok"
    assert all(read_record(p)["status"] == "interrupted" for p in (orphan, dead, superseded))
    assert "another job" in read_record(superseded)["error"]
