import errno
import json
import os

import pytest
import torch

from budget_callback.errors import SnapshotWriteError
from budget_callback.reader import SnapshotReader
from budget_callback.storage import SnapshotLayout
from budget_callback.writer import MANIFEST, SnapshotWriter, clean_temporaries


def _w(step):
    return {"unembedding": torch.full((5, 3), float(step), dtype=torch.bfloat16)}


def test_files_and_manifest_are_complete(tmp_path):
    layout = SnapshotLayout(5, 3, "bfloat16")
    w = SnapshotWriter(tmp_path, layout, every=1)
    w.start()
    for s in range(1, 5):
        w.submit(s, _w(s))
    w.close()
    assert w.bytes_written == layout.series_bytes(4, 1)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["last_step"] == 4 and manifest["files_written"] == 4 and manifest["dtype"] == "bfloat16"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporaries left


def test_partial_stack_is_flushed_on_close(tmp_path):
    layout = SnapshotLayout(5, 3, "bfloat16", snapshots_per_file=4)
    w = SnapshotWriter(tmp_path, layout, every=2)
    w.start()
    for s in (2, 4, 6, 8, 10, 12):
        w.submit(s, _w(s))
    w.close()
    reader = SnapshotReader(tmp_path)
    assert reader.steps == [2, 4, 6, 8, 10, 12]
    assert torch.equal(reader.load(10), _w(10)["unembedding"])
    assert w.bytes_written == layout.series_bytes(12, 2)


def test_disk_full_loses_one_snapshot_and_keeps_going(tmp_path, monkeypatch):
    """Portable ENOSPC: the write of step 3 fails as a full disk would."""
    import budget_callback.writer as writer_module

    real = writer_module.save_file

    def failing(tensors, path, metadata=None):
        if metadata["first_step"] == "3":
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(writer_module, "save_file", failing)
    w = SnapshotWriter(tmp_path, SnapshotLayout(5, 3, "bfloat16"), every=1)
    w.start()
    for s in range(1, 6):
        w.submit(s, _w(s))
    w.close()
    assert w.stats.failed == 1 and w.stats.events[0]["event"] == "disk_full"
    assert SnapshotReader(tmp_path).steps == [1, 2, 4, 5]
    assert [n for n in os.listdir(tmp_path) if "tmp" in n] == []


def test_writer_error_surfaces_in_training_thread(tmp_path, monkeypatch):
    import budget_callback.writer as writer_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(writer_module, "save_file", broken)
    w = SnapshotWriter(tmp_path, SnapshotLayout(5, 3, "bfloat16"), every=1)
    w.start()
    w.submit(1, _w(1))
    with pytest.raises(SnapshotWriteError, match="disk controller on fire") as info:
        w.flush()
    assert isinstance(info.value.__cause__, RuntimeError)
    w.close()


def test_drop_policy_counts_dropped(tmp_path, monkeypatch):
    import threading

    import budget_callback.writer as writer_module

    gate = threading.Event()
    real = writer_module.save_file

    def slow(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "save_file", slow)
    w = SnapshotWriter(tmp_path, SnapshotLayout(5, 3, "bfloat16"), every=1, queue_depth=1, when_behind="drop")
    w.start()
    accepted = [w.submit(s, _w(s)) for s in range(1, 6)]
    gate.set()
    w.close()
    assert w.stats.dropped == accepted.count(False) >= 1
    assert len(SnapshotReader(tmp_path)) == accepted.count(True)


def test_clean_temporaries(tmp_path):
    (tmp_path / ".step_000000001.safetensors.tmp-123").write_bytes(b"x")
    (tmp_path / "step_000000001.safetensors").write_bytes(b"keep")
    assert clean_temporaries(tmp_path) == [".step_000000001.safetensors.tmp-123"]
    assert os.listdir(tmp_path) == ["step_000000001.safetensors"]
