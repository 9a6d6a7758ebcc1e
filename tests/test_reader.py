import pytest
import torch

from budget_callback.reader import SnapshotReader
from budget_callback.storage import SnapshotLayout
from budget_callback.writer import SnapshotWriter


@pytest.fixture
def snapshots(tmp_path):
    w = SnapshotWriter(tmp_path, SnapshotLayout(6, 2, "float32", snapshots_per_file=3), every=5)
    w.start()
    for s in range(5, 41, 5):
        w.submit(s, {"unembedding": torch.arange(12, dtype=torch.float32).reshape(6, 2) + s})
    w.close()
    return tmp_path


def test_steps_load_and_trajectory_across_stacked_files(snapshots):
    r = SnapshotReader(snapshots)
    assert r.steps == list(range(5, 41, 5)) and len(r) == 8
    assert torch.equal(r.load(20)[3], torch.tensor([26.0, 27.0]))
    traj = r.trajectory(3)
    assert traj.shape == (8, 2)
    assert torch.equal(traj[:, 0], torch.tensor([6.0 + s for s in range(5, 41, 5)]))


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


def test_temporaries_are_never_listed(snapshots):
    (snapshots / ".step_000000045.safetensors.tmp-99").write_bytes(b"partial")
    assert SnapshotReader(snapshots).steps[-1] == 40
