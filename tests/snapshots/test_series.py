"""The series' one owner: what opening a directory means (decided reading only), state and manifest from one place."""

import json
import os
from dataclasses import replace

import pytest
from safetensors.torch import save_file
import torch

from budget_callback.snapshots.format import MANIFEST, SnapshotLayout
from budget_callback.snapshots.schedule import Schedule
from budget_callback.snapshots.series import prepare, restored_series
from helpers import write_series

LAYOUT = SnapshotLayout(6, 2, "float32", 3)


def _listing(path):
    return sorted((n, os.path.getsize(path / n)) for n in os.listdir(path))


def test_new_series_in_an_empty_directory(tmp_path):
    plan = prepare(tmp_path / "s", LAYOUT, None, overwrite=False)
    assert not plan.resuming and plan.edits == [] and len(plan.run_id) == 16
    series, removed, open_file = plan.commit(Schedule.start(LAYOUT, 1))
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["run_id"] == plan.run_id and manifest["status"] == "running" and open_file is None


def test_another_runs_snapshots_are_refused_and_untouched(tmp_path):
    write_series(tmp_path, LAYOUT, range(1, 6), run_id="old-run")
    before = _listing(tmp_path)
    with pytest.raises(ValueError, match="already holds snapshots of run old-run.*overwrite=True"):
        prepare(tmp_path, LAYOUT, None, overwrite=False, checkpoint_hint="HINT")
    assert _listing(tmp_path) == before


def test_overwrite_replaces_the_series_and_leaves_other_files(tmp_path):
    write_series(tmp_path, LAYOUT, range(1, 6), run_id="old-run")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "mine.safetensors"))
    plan = prepare(tmp_path, LAYOUT, None, overwrite=True)
    assert "mine.safetensors" in plan.warnings[0]
    plan.commit(Schedule.start(LAYOUT, 1))
    assert sorted(os.listdir(tmp_path)) == [MANIFEST, "mine.safetensors"]


def test_resume_cuts_what_came_after_the_checkpoint_and_continues_the_open_file(tmp_path):
    series, _ = write_series(tmp_path, LAYOUT, range(1, 5))  # state at step 4: file 1-3 closed, 4 open
    state = series.state_dict()
    write_series(tmp_path / "later", LAYOUT, range(1, 9))  # what the crashed run went on to write
    for name in os.listdir(tmp_path / "later"):
        if name.endswith(".safetensors"):
            os.replace(tmp_path / "later" / name, tmp_path / name)
    plan = prepare(tmp_path, LAYOUT, restored_series(state), overwrite=False)
    assert plan.resuming and plan.run_id == "test-run"
    assert [(e.path.name, e.keep) for e in plan.edits] == [("step_000000004.safetensors", 1),
                                                          ("step_000000007.safetensors", 0)]
    resumed, _, open_file = plan.commit(plan.schedule)
    assert open_file is not None and list(open_file.steps) == [4]
    assert resumed.bytes_written == state["bytes_on_disk"] and resumed.schedule.state() == state["schedule"]


def test_resume_refuses_another_runs_directory(tmp_path):
    series, _ = write_series(tmp_path / "a", LAYOUT, range(1, 4), run_id="run-a")
    write_series(tmp_path / "b", LAYOUT, range(1, 4), run_id="run-b")
    before = _listing(tmp_path / "b")
    with pytest.raises(ValueError, match="holds snapshots of run run-b, but the checkpoint .* belongs to run run-a"):
        prepare(tmp_path / "b", LAYOUT, restored_series(series.state_dict()), overwrite=False)
    assert _listing(tmp_path / "b") == before


@pytest.mark.parametrize("change, argument, values", [
    ({"dtype": "bfloat16"}, "snapshot_dtype", ("'bfloat16'", "'float32'")),
    ({"snapshots_per_file": 4}, "snapshots_per_file", ("4", "3")),
    ({"include_embedding": True}, "include_embedding", ("True", "False")),
])
def test_resume_with_another_layout_is_refused_naming_both_values(tmp_path, change, argument, values):
    series, _ = write_series(tmp_path, LAYOUT, range(1, 4))
    before = _listing(tmp_path)
    with pytest.raises(ValueError, match=rf"`{argument}` is {values[0]} but .* written with {argument}={values[1]}"):
        prepare(tmp_path, replace(LAYOUT, **change), restored_series(series.state_dict()), overwrite=False)
    assert _listing(tmp_path) == before


def test_states_without_a_series_are_not_a_resume():
    """Lightning's lr_find and batch-size scaling restore a temporary checkpoint taken before the series started."""
    assert restored_series(None) is None
    assert restored_series({"version": 2, "run_id": None}) is None
    legacy = {"version": 1, "save_every_n_steps": 2, "global_step": 4, "intervals": [{"from_step": 1, "every": 2}]}
    assert restored_series(legacy) is legacy


def test_legacy_state_resumes_from_the_files(tmp_path):
    layout = SnapshotLayout(6, 2, "float32")
    write_series(tmp_path, layout, range(1, 9), every=2)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest.pop("run_id")  # written before run ids
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    legacy = {"version": 1, "save_every_n_steps": 2, "global_step": 4, "intervals": [{"from_step": 1, "every": 2}]}
    plan = prepare(tmp_path, layout, restored_series(legacy), overwrite=False)
    assert plan.schedule.snapshots == 2 and plan.schedule.last_step == 4
    assert [e.path.name for e in plan.edits] == ["step_000000006.safetensors", "step_000000008.safetensors"]


def test_manifest_and_state_come_from_the_same_owner(tmp_path):
    series, _ = write_series(tmp_path, LAYOUT, range(1, 8), every=2)
    manifest, state = series.manifest(), series.state_dict()
    assert manifest["run_id"] == state["run_id"] and manifest["intervals"] == state["schedule"]["segments"]
    assert manifest["bytes_written"] == state["bytes_on_disk"] == series.bytes_written
    assert manifest["last_step"] == state["schedule"]["last_step"] == 7
