"""The writer: complete files and manifest, stacks flushed and rewritten in place, losses counted, errors surfaced."""

import errno
import json
import os

import pytest
import torch

import budget_callback.snapshots.writer as writer_module
from budget_callback.errors import SnapshotWriteError
from budget_callback.snapshots.format import MANIFEST, SnapshotLayout
from budget_callback.snapshots.reader import SnapshotReader
from budget_callback.snapshots.schedule import Schedule, series_bytes
from budget_callback.snapshots.series import Series
from budget_callback.snapshots.writer import SnapshotWriter
from helpers import write_series

LAYOUT = SnapshotLayout(5, 3, "bfloat16")


def _w(step):
    return {"unembedding": torch.full((5, 3), float(step), dtype=torch.bfloat16)}


def test_files_and_manifest_are_complete(tmp_path):
    series, _ = write_series(tmp_path, LAYOUT, range(1, 5))
    assert series.bytes_written == series_bytes(LAYOUT, 4, 1) == series.schedule.due_bytes()
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["last_step"] == 4 and manifest["files_written"] == 4 and manifest["dtype"] == "bfloat16"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporaries left


def test_partial_stack_is_flushed_on_close(tmp_path):
    layout = SnapshotLayout(5, 3, "bfloat16", snapshots_per_file=4)
    series, _ = write_series(tmp_path, layout, range(1, 13), every=2)
    reader = SnapshotReader(tmp_path)
    assert reader.steps == [2, 4, 6, 8, 10, 12]
    assert torch.equal(reader.load(10), torch.full((5, 3), 10.0, dtype=torch.bfloat16))
    assert series.bytes_written == series_bytes(layout, 12, 2)


def test_checkpoint_flush_keeps_the_stack_open_and_rewrites_it_in_place(tmp_path):
    layout = SnapshotLayout(5, 3, "bfloat16", snapshots_per_file=4)
    series = Series(tmp_path, layout, "r", Schedule.start(layout, 1))
    writer = SnapshotWriter(series)
    writer.start()
    for step in range(1, 7):
        writer.submit(series.place(step), _w(step))
        if step == 2:
            writer.flush(final=False)  # before a checkpoint: steps 1-2 durable, in the file of step 1
            assert series.files == {1: (2, layout.file_bytes(1, 2, 1))}
    writer.close()
    assert sorted(series.files) == [1, 5] and series.files[1][0] == 4
    assert series.bytes_written == series_bytes(layout, 6, 1)


def test_disk_full_loses_one_snapshot_and_keeps_going(tmp_path, monkeypatch):
    """Portable ENOSPC: the write of step 3 fails as a full disk would."""
    real = writer_module.save_file

    def failing(tensors, path, metadata=None):
        if metadata["first_step"] == "3":
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(writer_module, "save_file", failing)
    series, _ = write_series(tmp_path, LAYOUT, range(1, 6))
    assert series.lost == 1 and series.events[0]["event"] == "disk_full"
    assert SnapshotReader(tmp_path).steps == [1, 2, 4, 5]
    assert [n for n in os.listdir(tmp_path) if "tmp" in n] == []


def test_writer_error_surfaces_in_training_thread(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(writer_module, "save_file", broken)
    series = Series(tmp_path, LAYOUT, "r", Schedule.start(LAYOUT, 1))
    w = SnapshotWriter(series)
    w.start()
    w.submit(series.place(1), _w(1))
    with pytest.raises(SnapshotWriteError, match="disk controller on fire") as info:
        w.flush()
    assert isinstance(info.value.__cause__, RuntimeError)
    w.close()
