"""The reader: steps, load and trajectory in both layouts; bad files never hide valid ones."""

import pytest
import torch

from budget_callback.snapshots.format import SnapshotLayout
from budget_callback.snapshots.reader import SnapshotReader
from helpers import write_series


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


def test_cold_reads_after_the_page_cache_is_dropped(snapshots):
    import os

    with SnapshotReader(snapshots) as r:
        warm = r.trajectory(4)
        for name in os.listdir(snapshots):
            fd = os.open(snapshots / name, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        assert torch.equal(r.trajectory(4), warm)


def test_mapped_and_read_rows_are_the_same_and_a_cut_file_is_an_error(snapshots):
    """A trajectory that found every row cached reads the next from memory maps; a file cut short under
    the reader is an error naming it, not a crash."""
    with SnapshotReader(snapshots) as r:
        first = r.trajectory(2)  # read with pread
        assert r._warm["unembedding"]
        again = r.trajectory(2)  # from the maps
        assert torch.equal(first.view(torch.int32), again.view(torch.int32))
        (snapshots / "step_000000020.safetensors").write_bytes(b"cut")
        r._sizes_checked = float("-inf")  # the next mapped read checks the sizes (at most a second later)
        with pytest.raises(OSError, match="step_000000020.safetensors"):
            r.trajectory(2)
