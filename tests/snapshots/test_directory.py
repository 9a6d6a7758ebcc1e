"""The directory: the lock, reading what is there without trusting it, and planned-then-applied resume edits."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from budget_callback.errors import SnapshotDirInUseError
from budget_callback.snapshots.directory import (BadFile, DirectoryLock, apply_edits, clean_temporaries, plan_truncation,
                                                 read_snapshot_file, scan)
from budget_callback.snapshots.format import LOCK_FILE, SnapshotLayout
import platforms
from helpers import write_series

pytestmark = pytest.mark.usefixtures("io_platform")  # linux, macos, windows: see conftest.py

LAYOUT = SnapshotLayout(6, 2, "float32")
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = DirectoryLock(tmp_path / "s")
    first.acquire(run="run-a")
    holder = json.loads((tmp_path / "s" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(SnapshotDirInUseError, match=rf"in use by another fit \(pid {os.getpid()} on "):
        DirectoryLock(tmp_path / "s").acquire()
    first.release()
    assert not (tmp_path / "s").exists()  # it created the directory and left nothing in it
    second = DirectoryLock(tmp_path / "s")
    second.acquire()
    second.release()


def _child(code: str, io_platform: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a real second process lacking what ``io_platform`` lacks, as this test process does."""
    prelude = platforms.child_prelude(io_platform, TESTS)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_lock_is_held_against_another_process(tmp_path, io_platform):
    """A real second process: flock is per open file (the exclusively created file where there is no flock),
    so the refusal is what another fit would see."""
    holder = DirectoryLock(tmp_path)
    holder.acquire()
    out = _child(f"""
        from budget_callback.snapshots.directory import DirectoryLock
        try:
            DirectoryLock({str(tmp_path)!r}).acquire()
        except Exception as err:
            print(type(err).__name__, err)
    """, io_platform).stdout
    holder.release()
    assert out.startswith("SnapshotDirInUseError") and f"pid {os.getpid()}" in out
    assert os.listdir(tmp_path) == []


def test_a_lock_left_by_a_killed_holder_is_taken(tmp_path, io_platform):
    """A holder killed with SIGKILL releases nothing itself: flock is released by the kernel, and a lock file
    whose holder ran here and is gone is taken over. The new holder's name is in the file."""
    proc = _child(f"""
        import os, signal
        from budget_callback.snapshots.directory import DirectoryLock
        DirectoryLock({str(tmp_path)!r}).acquire(run="killed")
        os.kill(os.getpid(), signal.SIGKILL)
    """, io_platform)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["run"] == "killed"  # left behind
    lock = DirectoryLock(tmp_path)
    lock.acquire(run="next")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["run"] == "next"
    with pytest.raises(SnapshotDirInUseError, match=f"pid {os.getpid()}"):
        DirectoryLock(tmp_path).acquire()
    lock.release()
    assert os.listdir(tmp_path) == []


def test_a_lock_file_of_a_live_holder_elsewhere_is_refused_naming_it(tmp_path, io_platform):
    """Where the lock is the file itself, a holder on another host cannot be asked whether it runs: refused,
    and the message names the file to remove. (With flock, the kernel knows: an unlocked file is free.)"""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "another-host", "since": "then",
                                                  "command": "train.py"}))
    lock = DirectoryLock(tmp_path)
    if io_platform != "windows":
        lock.acquire()
        lock.release()
        return
    with pytest.raises(SnapshotDirInUseError, match=r"pid 1 on another-host since then: train.py.*if no fit runs "
                                                    r"there, remove .*\.budget-callback\.lock"):
        lock.acquire()
    assert (tmp_path / LOCK_FILE).exists() and not lock.held


def test_scan_sorts_out_valid_bad_foreign_and_temporaries(tmp_path):
    write_series(tmp_path, LAYOUT, range(1, 4))
    good = (tmp_path / "step_000000002.safetensors").read_bytes()
    (tmp_path / "step_000000009.safetensors").write_bytes(good[: len(good) - 5])  # truncated
    (tmp_path / "step_000000010.safetensors").write_bytes(b"\xff" * 8 + b"junk")  # absurd header length
    (tmp_path / "step_000000011.safetensors").write_bytes(b"abc")  # shorter than the length field
    save_file({"x": torch.zeros(2)}, str(tmp_path / "notes.safetensors"))  # someone else's file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "step_000000012.safetensors"))  # not ours, our name
    (tmp_path / ".tmpAbC123").write_bytes(b"safetensors' own temporary")
    (tmp_path / ".step_000000013.safetensors.tmp-77").write_bytes(b"ours")
    found = scan(tmp_path)
    assert [f.first_step for f in found.files] == [1, 2, 3]
    reasons = {b.path.name: b.reason for b in found.bad}
    assert "truncated" in reasons["step_000000009.safetensors"]
    assert "does not fit" in reasons["step_000000010.safetensors"]
    assert "shorter than" in reasons["step_000000011.safetensors"]
    assert "not a budget-callback snapshot" in reasons["step_000000012.safetensors"]
    assert [p.name for p in found.foreign] == ["notes.safetensors"]
    assert sorted(clean_temporaries(found)) == [".step_000000013.safetensors.tmp-77", ".tmpAbC123"]
    assert found.run_id == "test-run"


@pytest.mark.parametrize("per_file", [1, 3])
def test_a_scan_compares_headers_yet_finds_what_a_full_check_of_each_finds(tmp_path, per_file):
    """A scan checks one header of a kind in full and compares the next ones with it byte for byte (but for the
    first step); a file that differs anywhere else gets the full check: the scan's answer is, file by file, what
    checking every header by itself gives. Steps 1..120 (one to three digits)."""
    write_series(tmp_path, SnapshotLayout(6, 2, "float32", per_file), range(1, 121))
    names = sorted(p.name for p in tmp_path.glob("step_*.safetensors"))
    step = lambda i: int(names[i][5:14])  # noqa: E731
    edits = {  # same size, a byte changed: other metadata (valid), another first step, an invalid tensor entry
        names[3]: (b'"every":"1"', b'"every":"2"'),
        names[5]: (b'"first_step":"%d"' % step(5), b'"first_step":"%d"' % (step(5) + 1)),
        names[7]: (b'"shape"', b'"shapE"'),
    }
    for name, (old, new) in edits.items():
        path = tmp_path / name
        data = path.read_bytes()
        assert old in data
        path.write_bytes(data.replace(old, new, 1))
    (tmp_path / names[11]).write_bytes((tmp_path / names[11]).read_bytes() + b"x")  # one byte more
    found = scan(tmp_path)
    alone = [read_snapshot_file(tmp_path / name) for name in names]
    assert found.files == [f for f in alone if not isinstance(f, BadFile)]
    assert [(b.path.name, b.reason) for b in found.bad] == [(b.path.name, b.reason) for b in alone
                                                              if isinstance(b, BadFile)]
    assert {b.path.name for b in found.bad} == {names[5], names[7], names[11]}
    assert next(f for f in found.files if f.name == names[3]).every == 2


def test_read_snapshot_file_checks_metadata_against_the_name(tmp_path):
    write_series(tmp_path, LAYOUT, [1])
    os.rename(tmp_path / "step_000000001.safetensors", tmp_path / "step_000000005.safetensors")
    parsed = read_snapshot_file(tmp_path / "step_000000005.safetensors")
    assert isinstance(parsed, BadFile) and "do not match the file name" in parsed.reason


def test_truncation_is_planned_then_applied(tmp_path):
    layout = SnapshotLayout(6, 2, "float32", 4)
    series, _ = write_series(tmp_path, layout, range(1, 11))  # files 1-4, 5-8, 9-10
    found = scan(tmp_path)
    edits = plan_truncation(found, 6)
    assert [(e.path.name, e.keep) for e in edits] == [("step_000000005.safetensors", 2),
                                                     ("step_000000009.safetensors", 0)]
    assert len(os.listdir(tmp_path)) == 4  # planning touched nothing
    apply_edits(edits, found, layout)
    after = scan(tmp_path)
    assert [f.steps for f in after.files] == [(1, 2, 3, 4), (5, 6)]
    cut = after.files[1]
    assert cut.size == layout.file_bytes_for([5, 6], 1)
    from safetensors import safe_open

    with safe_open(str(cut.path), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("unembedding")[1], torch.full((6, 2), 6.0))
