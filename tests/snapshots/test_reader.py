"""The reader: steps, load and trajectory in both layouts; bad files never hide valid ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from budget_callback.snapshots import reader as reader_module
from budget_callback.snapshots.format import SnapshotLayout
from budget_callback.snapshots.reader import SnapshotReader
import platforms
from helpers import write_series

pytestmark = pytest.mark.usefixtures("io_platform")  # linux, macos, windows: see conftest.py

ROOT = str(Path(__file__).resolve().parents[2])
TESTS = str(Path(__file__).resolve().parents[1])


def _fill(step, name):
    return torch.arange(12, dtype=torch.float32).reshape(6, 2) + step


@pytest.fixture
def snapshots(tmp_path):
    write_series(tmp_path, SnapshotLayout(6, 2, "float32", snapshots_per_file=3), range(1, 41), every=5, fill=_fill)
    return tmp_path


def test_steps_load_and_trajectory_across_stacked_files(snapshots):
    r = SnapshotReader(snapshots)
    assert r.steps == list(range(5, 41, 5)) and len(r) == 8
    assert torch.equal(r.load(20)[3], torch.tensor([26.0, 27.0]))
    traj = r.trajectory(3)
    assert traj.shape == (8, 2)
    assert torch.equal(traj[:, 0], torch.tensor([6.0 + s for s in range(5, 41, 5)]))


def test_irregular_steps_from_several_optimizers(tmp_path):
    """Batch ends every 2 optimizer steps, interval 3: steps 4, 6, 10, 12 stored with their explicit list."""
    write_series(tmp_path, SnapshotLayout(6, 2, "float32", 3), range(2, 13, 2), every=3, stride=2, fill=_fill)
    r = SnapshotReader(tmp_path)
    assert r.steps == [4, 6, 10, 12]
    assert torch.equal(r.trajectory(0)[:, 0], torch.tensor([4.0, 6.0, 10.0, 12.0]))


def test_errors_name_what_is_wrong(snapshots, tmp_path):
    r = SnapshotReader(snapshots)
    with pytest.raises(KeyError, match="no snapshot at step 7"):
        r.load(7)
    with pytest.raises(IndexError, match="token_id"):
        r.trajectory(6)
    with pytest.raises(KeyError, match="include_embedding=True"):
        r.load(5, name="embedding")
    with pytest.raises(ValueError, match="`name`"):
        r.load(5, name="W")
    with pytest.raises(FileNotFoundError, match="snapshot_dir"):
        SnapshotReader(tmp_path / "missing")


def test_stray_and_truncated_files_are_named_not_fatal(snapshots, record):
    (snapshots / ".step_000000045.safetensors.tmp-99").write_bytes(b"partial")
    good = (snapshots / "step_000000005.safetensors").read_bytes()
    (snapshots / "step_000000045.safetensors").write_bytes(good[:100])  # truncated
    (snapshots / "step_000000050.safetensors").write_bytes(b"\xff" * 64)  # a huge header length: MemoryError before
    (snapshots / "step_000000055.safetensors").write_bytes(b"x")  # struct.error before
    with pytest.warns(UserWarning, match="3 file.*step_000000045.safetensors.*truncated"):
        r = SnapshotReader(snapshots)
    assert r.steps == list(range(5, 41, 5)) and set(r.bad_files) == {
        "step_000000045.safetensors", "step_000000050.safetensors", "step_000000055.safetensors"}
    assert r.trajectory(1).shape == (8, 2)
    record(valid=len(r), bad=r.bad_files)


def test_a_file_damaged_after_opening_is_named_when_read(snapshots):
    r = SnapshotReader(snapshots)
    (snapshots / "step_000000020.safetensors").write_bytes(b"gone")
    with pytest.raises(OSError, match="step_000000020.safetensors"):
        r.load(20)


def test_token_ids_are_range_checked_without_a_manifest(snapshots):
    (snapshots / "manifest.json").unlink()
    r = SnapshotReader(snapshots)
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        r.trajectory(6)
    with pytest.raises(IndexError):
        r.trajectory(-1)


@pytest.mark.parametrize("tokens", [[3, 0, 5, 3], [0, 1, 2, 3, 4, 5], [5]])
def test_rows_of_many_tokens_equal_the_matrices(snapshots, tokens):
    """Sparse (scattered reads) and dense (whole matrices, gathered) paths give the same rows as load()."""
    with SnapshotReader(snapshots) as r:
        got = r.rows(tokens)
        assert got.shape == (len(tokens), len(r.steps), 2)
        for s, step in enumerate(r.steps):
            assert torch.equal(got[:, s], r.load(step)[tokens])
        assert torch.equal(got[0], r.trajectory(tokens[0]))


@pytest.mark.parametrize("dtype,hidden", [("bfloat16", 3), ("float32", 4)])  # 6-byte rows; 16-byte rows (as int64)
@pytest.mark.parametrize("per_file", [1, 4])
@pytest.mark.parametrize("strategy", ["runs", "whole"])
def test_rows_by_either_strategy_equal_the_matrices(tmp_path, monkeypatch, dtype, hidden, per_file, strategy):
    """Both ways rows() reads, forced by the cost model's constants: the runs of rows, or whole matrices gathered
    in blocks of steps (blocks, passes and calls made small here, so that 23 steps span several of each and no
    count divides another), give what load() gives, duplicates and order kept."""
    V = 40
    write_series(tmp_path, SnapshotLayout(V, hidden, dtype, per_file), range(1, 24),
                 fill=lambda step, name: torch.arange(V * hidden, dtype=torch.float32).reshape(V, hidden) + 100 * step)
    monkeypatch.setattr(reader_module, "_ROW_COST_BYTES" if strategy == "whole" else "_GATHER_ROW_BYTES", 1 << 40)
    monkeypatch.setattr(reader_module, "_STAGE_STEPS", 5)
    monkeypatch.setattr(reader_module, "_CALL_ELEMENTS", 7)  # a pass's rows in several calls, a block's too
    monkeypatch.setattr(reader_module, "_PREFAULT_BYTES", 0)  # the result's pages faulted in by another thread
    dense = []
    real = SnapshotReader._rows_dense
    monkeypatch.setattr(SnapshotReader, "_rows_dense", lambda self, *a: dense.append(1) or real(self, *a))
    tokens = [39, 0, 7, 8, 9, 21, 7, 30]
    with SnapshotReader(tmp_path) as r:
        chunk = 2 * r.matrix_bytes  # two matrices per pass
        got = r.rows(tokens, chunk_bytes=chunk, gap_bytes=r.row_bytes)  # 7, 8, 9 one run
        want = torch.stack([r.load(step)[tokens] for step in r.steps], 1)
        assert got.dtype == getattr(torch, dtype) and torch.equal(got, want)
        monkeypatch.setattr(reader_module, "_CALL_ELEMENTS", 1 << 20)  # a pass's rows in one call
        assert torch.equal(r.rows(tokens, chunk_bytes=chunk), want)
    assert len(dense) == (2 if strategy == "whole" else 0)


def test_a_large_result_is_faulted_in_by_another_thread_meanwhile(monkeypatch, io_platform):
    """rows() hands its result's page faults to another thread (MADV_POPULATE_WRITE, a few pages at a time) while
    it reads; what the reads write stays; a small result, or a platform without the call, goes without. (The body
    here waits for the thread, event-driven, so that every call is seen.)"""
    import threading

    from budget_callback.snapshots import osio

    calls, done, real = [], threading.Event(), osio.populate_write

    def spy(address, nbytes):
        calls.append((address, nbytes))
        ok = real(address, nbytes)
        if not ok or address + nbytes == end:
            done.set()
        return ok

    monkeypatch.setattr(osio, "populate_write", spy)
    monkeypatch.setattr(reader_module, "_PREFAULT_BYTES", 1 << 20)
    monkeypatch.setattr(reader_module, "_PREFAULT_CHUNK", 64 << 10)
    small = torch.empty((1 << 20) - 1, dtype=torch.uint8)
    with reader_module._prefaulted(small):
        small.fill_(3)
    assert calls == [] and bool(small.eq(3).all())
    big = torch.empty(1 << 20, dtype=torch.uint8)
    start, end = -(-big.data_ptr() // 4096) * 4096, (big.data_ptr() + (1 << 20)) // 4096 * 4096
    with reader_module._prefaulted(big):
        big.fill_(7)
        assert done.wait(60)
    assert bool(big.eq(7).all())
    if io_platform == "windows":  # no libc: the first call says so, and the thread stops
        assert calls == [(start, 64 << 10)]
    else:  # every whole page of the tensor, in order, 64 KiB at a time
        assert calls == [(at, min(64 << 10, end - at)) for at in range(start, end, 64 << 10)]


def test_cold_reads_after_the_page_cache_is_dropped(snapshots):
    with SnapshotReader(snapshots) as r:
        warm = r.trajectory(4)
        for name in os.listdir(snapshots):
            platforms.evict(snapshots / name)
        assert torch.equal(r.trajectory(4), warm)


def test_mapped_and_read_rows_are_the_same_and_a_cut_file_is_an_error(snapshots, io_platform):
    """A trajectory that found every row cached reads the next from memory maps (on Linux; elsewhere with
    pread again); a file cut short under the reader is an error naming it, not a crash."""
    with SnapshotReader(snapshots) as r:
        first = r.trajectory(2)  # read with pread
        assert r._warm["unembedding"] == (io_platform == "linux")  # no RWF_NOWAIT: no way to know it was cached
        again = r.trajectory(2)  # from the maps
        assert torch.equal(first.view(torch.int32), again.view(torch.int32))
        (snapshots / "step_000000020.safetensors").write_bytes(b"cut")
        r._sizes_checked = float("-inf")  # the next mapped read checks the sizes (at most a second later)
        with pytest.raises(OSError, match="step_000000020.safetensors"):
            r.trajectory(2)


# --- a long series under a low open-files limit: bounded fds and mappings --------------------------------------------
_LOW_LIMIT_CHILD = """
import json, os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
low = min(64, soft)
resource.setrlimit(resource.RLIMIT_NOFILE, (low, low if sys.argv[2] == "lowered" else hard))
import torch
from budget_callback.snapshots.reader import SnapshotReader

directory = os.path.realpath(sys.argv[1])
def held():  # descriptors and mappings of snapshot files this process holds now
    fds = sum(os.readlink(f"/proc/self/fd/{n}").startswith(directory) for n in os.listdir("/proc/self/fd")
              if os.path.islink(f"/proc/self/fd/{n}"))
    maps = len({line.split()[-1] for line in open("/proc/self/maps") if directory in line})
    return fds, maps
r = SnapshotReader(directory)
seen = [held()]
first, again = r.trajectory(3), r.trajectory(3)  # read with preadv, then from the mappings
seen.append(held())
rows = r.rows([5, 0, 3])
seen.append(held())
loads_match = all(torch.equal(r.load(step)[[5, 0, 3]], rows[:, s]) for s, step in enumerate(r.steps))
seen.append(held())
r.close()
print(json.dumps({"steps": len(r.steps), "trajectory": first[:, 0].tolist(), "same_again": torch.equal(first, again),
                  "loads_match": loads_match, "held": seen, "after_close": held(),
                  "limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)), "low": low}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
@pytest.mark.parametrize("hard", ["unchanged", "lowered"])
def test_a_long_series_reads_under_a_low_open_files_limit(tmp_path, hard, io_platform):
    """300 files under `ulimit -n 64`: the reader used to open (and keep) every file, raising the soft limit
    to fit (or failing with EMFILE where the hard limit is lower). Now it holds at most a quarter of the
    soft limit open and leaves the limit alone."""
    if io_platform == "windows":
        pytest.skip("Windows has no RLIMIT_NOFILE to lower (no `resource` module): the bound is its default, 128")
    write_series(tmp_path, SnapshotLayout(6, 2, "float32"), range(1, 301), fill=_fill)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    child = platforms.child_prelude(io_platform, TESTS) + _LOW_LIMIT_CHILD
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path), hard], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["steps"] == 300 and got["trajectory"] == [6.0 + s for s in range(1, 301)]
    assert got["same_again"] and got["loads_match"]
    assert got["limit"][0] == got["low"]  # the soft limit is as the process set it
    assert all(fds <= got["low"] // 4 for fds, _ in got["held"]), got["held"]
    assert got["after_close"] == [0, 0]


@pytest.fixture
def bounded(tmp_path, monkeypatch, io_platform):
    """12 files, a reader that keeps at most 3 open and 5 mapped."""
    monkeypatch.setattr(reader_module, "_MAX_OPEN_FILES", 3)
    monkeypatch.setattr(reader_module, "_MAX_OPEN_FILES_NO_RLIMIT", 3)
    monkeypatch.setattr(reader_module, "_MAX_MAPS", 5)
    write_series(tmp_path, SnapshotLayout(6, 2, "float32"), range(1, 13), fill=_fill)
    return tmp_path


def test_reads_past_the_bounds_equal_the_matrices(bounded, io_platform):
    maps = 5 if io_platform == "linux" else 0  # mapped reads need libc's process_vm_readv
    with SnapshotReader(bounded) as r:
        assert r._fds == {} and r._maps == {}  # opening reads the headers only
        expected = torch.stack([r.load(step)[4] for step in r.steps])
        assert len(r._fds) <= 3 and len(r._maps) == maps  # files are mapped as reads first open them
        assert torch.equal(r.trajectory(4), expected) and r._warm["unembedding"] == (io_platform == "linux")
        assert torch.equal(r.trajectory(4), expected)  # five files from the mappings, seven with preadv
        got = r.rows(torch.tensor([4, 1, 4]))
        assert torch.equal(got[0], expected) and torch.equal(got[2], expected)
        assert torch.equal(got[1][:, 0], torch.tensor([2.0 + s for s in r.steps]))
        assert len(r._fds) <= 3 and len(r._maps) == maps


def test_a_file_replaced_after_its_descriptor_was_closed_is_named(bounded):
    """A file opened again must be the one indexed: a replacement (other offsets) is an error, not wrong rows. At
    its first opening a file must have the size and the header bytes read when the reader opened; from then on the
    same device, inode, size and mtime."""
    r = SnapshotReader(bounded)
    assert r._fds == {}  # opening read the headers only
    before = {step: r.load(step) for step in (1, 2, 6, 8)}  # 1 and 2 stay open; 6, then 8, in the spare slot
    assert r.steps.index(6) not in r._fds and r.steps.index(7) not in r._fds
    name = "step_000000006.safetensors"
    data = (bounded / name).read_bytes()
    os.utime(bounded / name, ns=(0, 0))  # rewritten in place since its first opening: another mtime
    with pytest.raises(OSError, match=f"{name} was replaced"):
        r.load(6)
    assert (bounded / name).read_bytes() == data
    other = bounded / "step_000000007.safetensors"  # never opened by the reader
    os.replace(bounded / "step_000000012.safetensors", other)  # another file, same size: another header
    with pytest.raises(OSError, match=f"{other.name} was replaced"):
        r.load(7)
    assert torch.equal(r.load(5), torch.full((6, 2), 5.0) + torch.arange(12.0).reshape(6, 2))
    assert torch.equal(r.load(8), before[8])
    r.close()


def test_a_file_rewritten_in_place_before_its_first_opening_is_named(bounded):
    """Same size, another header (another first step), written in place (same inode) before the reader first
    opened it: the header read again at its first opening differs."""
    r = SnapshotReader(bounded)
    name, other = "step_000000009.safetensors", (bounded / "step_000000010.safetensors").read_bytes()
    with open(bounded / name, "r+b") as fh:
        fh.write(other)
    with pytest.raises(OSError, match=f"{name} was replaced"):
        r.load(9)
    with pytest.raises(OSError, match=f"{name} was replaced"):
        r.trajectory(0)
    r.close()


def test_a_mapped_file_cut_after_its_descriptor_was_closed_is_an_error(bounded, io_platform):
    with SnapshotReader(bounded) as r:
        r.trajectory(1)
        name = "step_000000004.safetensors"  # mapped (on Linux), its descriptor closed
        assert (r.steps.index(4) in r._maps) == r._warm["unembedding"] == (io_platform == "linux")
        assert r.steps.index(4) not in r._fds
        os.truncate(bounded / name, 50)
        r._sizes_checked = float("-inf")
        with pytest.raises(OSError, match=name):
            r.trajectory(1)


_CUT_UNDER_THE_MAP_CHILD = """
import json, os, sys
import torch
from budget_callback.snapshots import reader as reader_module
from budget_callback.snapshots.reader import SnapshotReader
directory, token = sys.argv[1], int(sys.argv[2])
if sys.argv[3] == "mapped":  # no file kept open: each is read from its map once warm
    reader_module._MAX_OPEN_FILES = reader_module._MAX_OPEN_FILES_NO_RLIMIT = 1
r = SnapshotReader(directory)
first = r.trajectory(token)  # the files left the page cache as they were written: read with preadv
r.trajectory(token)  # every row cached now: the next reads come from the maps (on Linux)
warm = r.trajectory(token)  # from the maps, and the files' sizes were just checked (at most once a second)
os.truncate(os.path.join(directory, "step_000000002.safetensors"), 4096)  # in place: the pages of token's row go
try:
    r.trajectory(token)
    print(json.dumps({"raised": None}))
except OSError as err:
    print(json.dumps({"raised": str(err), "same": torch.equal(first, warm), "maps": len(r._maps)}))
"""


@pytest.mark.parametrize("kept", ["mapped", "open"])
def test_a_file_cut_under_its_mapping_is_an_error_not_sigbus(tmp_path, io_platform, kept):
    """Truncated in place between two warm trajectories: the row's page is past the file's new end. A copy made
    by the process itself (the reader's old mapped reads) died there of SIGBUS, killing the process; the kernel's
    copy (process_vm_readv) reports it, and the preadv that follows names the file. Files the reader keeps open
    are read with preadv, which reads short. Run in a child process so that a SIGBUS shows as its exit status."""
    layout = SnapshotLayout(1000, 64, "float32")  # 256 kB per file: row 900 lies 56 pages in
    write_series(tmp_path, layout, range(1, 4), fill=lambda step, name: torch.full((1000, 64), float(step)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    child = platforms.child_prelude(io_platform, TESTS) + _CUT_UNDER_THE_MAP_CHILD
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path), "900", kept], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    got = json.loads(proc.stdout)
    assert got["raised"] is not None and "step_000000002.safetensors" in got["raised"], got
    assert got["same"] and got["maps"] == (3 if io_platform == "linux" and kept == "mapped" else 0)


# --- token ids: numpy and torch integers ----------------------------------------------------------------------------
def test_token_ids_may_be_torch_integers(snapshots):
    r = SnapshotReader(snapshots)
    want = r.trajectory(3)
    assert torch.equal(r.trajectory(torch.tensor(3)), want)
    assert torch.equal(r.trajectory(torch.tensor(3, dtype=torch.int32)), want)
    assert torch.equal(r.trajectory(torch.tensor([5, 3]).max()), r.trajectory(5))  # what argmax/topk return
    both = r.rows([1, 2])
    assert torch.equal(r.rows(torch.tensor([1, 2])), both)
    assert torch.equal(r.rows(torch.tensor([1, 2], dtype=torch.uint8)), both)
    assert torch.equal(r.rows([torch.tensor(1), 2]), both)
    assert torch.equal(r.rows(range(1, 3)), both)
    assert r.rows(torch.tensor([], dtype=torch.long)).shape == (0, 8, 2)


def test_token_ids_may_be_numpy_integers(snapshots):
    np = pytest.importorskip("numpy")
    r = SnapshotReader(snapshots)
    want = r.trajectory(3)
    for token in (np.int64(3), np.uint8(3), np.int32(3), np.array(3)):
        assert torch.equal(r.trajectory(token), want), repr(token)
    both = r.rows([1, 2])
    assert torch.equal(r.rows(np.array([1, 2])), both)
    assert torch.equal(r.rows(np.array([1, 2], dtype=np.uint16)), both)
    assert torch.equal(r.rows([np.int64(1), np.int16(2)]), both)
    with pytest.raises(IndexError, match=r"`token_id` must be an int in \[0, 6\), got 6"):
        r.trajectory(np.int64(6))


@pytest.mark.parametrize("token, message", [
    (True, r"`token_id` must be an integer token id, not a bool, got bool True"),
    (3.0, r"`token_id` must be one integer .* got float 3\.0"),
    ("3", r"`token_id` must be one integer .* got str '3'"),
    (torch.tensor(3.0), r"`token_id` .* got a 0-D Tensor of shape \(\) and dtype torch\.float32"),
    (torch.tensor(True), r"`token_id` .* not a bool"),
    (torch.tensor([3]), r"`token_id` must be one integer .* got a 1-D Tensor of shape \(1,\)"),
])
def test_a_bad_token_id_names_the_argument_and_its_type(snapshots, token, message):
    with pytest.raises(TypeError, match=message):
        SnapshotReader(snapshots).trajectory(token)


@pytest.mark.parametrize("tokens, message", [
    (torch.tensor([[1, 2]]), r"`token_ids` must be a 1-D .* got a 2-D Tensor of shape \(1, 2\)"),
    (torch.tensor([1.0, 2.0]), r"`token_ids` must be a 1-D integer .* dtype torch\.float32"),
    (torch.tensor([True]), r"`token_ids` must be a 1-D integer .* dtype torch\.bool"),
    ([1, 2.5], r"`token_ids\[1\]` must be one integer .* got float 2\.5"),
    ([[1, 2]], r"`token_ids\[0\]` must be one integer .* got list \[1, 2\]"),
    ([1, False], r"`token_ids\[1\]` must be an integer token id, not a bool"),
    (3, r"`token_ids` must be a 1-D .* got int 3"),
    ("12", r"`token_ids` must be a 1-D .* got str '12'"),
])
def test_bad_token_ids_name_the_argument_and_their_type(snapshots, tokens, message):
    with pytest.raises(TypeError, match=message):
        SnapshotReader(snapshots).rows(tokens)


def test_bad_numpy_token_ids_name_the_argument_and_their_type(snapshots):
    np = pytest.importorskip("numpy")
    r = SnapshotReader(snapshots)
    with pytest.raises(TypeError, match=r"`token_ids` must be a 1-D .* got a 2-D ndarray of shape \(2, 1\)"):
        r.rows(np.array([[1], [2]]))
    with pytest.raises(TypeError, match=r"`token_ids` .* dtype float64"):
        r.rows(np.array([1.0]))
    with pytest.raises(TypeError, match=r"`token_id` .* not a bool"):
        r.trajectory(np.True_)
    with pytest.raises(TypeError, match=r"`token_id` .* float64"):
        r.trajectory(np.float64(3))
    with pytest.raises(IndexError, match=r"`token_ids\[0\]` must be an int in \[0, 6\), got 7"):
        r.rows(np.array([7]))
