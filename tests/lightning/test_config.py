"""Every constructor argument is checked up front; the message names the argument and what is accepted."""

import os

import pytest

from budget_callback import BudgetCallback


@pytest.mark.parametrize(
    "kwargs, match",
    [({"save_every_n_steps": 0}, "`save_every_n_steps`"), ({"save_every_n_steps": -2}, "`save_every_n_steps`"),
     ({"save_every_n_steps": 1.5}, "`save_every_n_steps`"), ({"snapshot_dtype": "int8"}, "`snapshot_dtype`"),
     ({"disk_budget": "12XB"}, "`disk_budget`"), ({"disk_budget": 0}, "`disk_budget`"),
     ({"memory_budget": "lots"}, "`memory_budget`"), ({"wandb_budget": -1}, "`wandb_budget`"),
     ({"on_exceed": "explode"}, "`on_exceed`"), ({"snapshots_per_file": 0}, "`snapshots_per_file`"),
     ({"snapshots_per_file": 10**9}, "`snapshots_per_file` must be at most"), ({"unembedding": 3}, "`unembedding`"),
     ({"snapshot_dir": ""}, "`snapshot_dir`"), ({"snapshot_dir": 5}, "`snapshot_dir`"),
     ({"when_behind": "panic"}, "`when_behind`"), ({"queue_depth": 0}, "`queue_depth`"),
     ({"disk_budget": "9" * 400 + "GB"}, "`disk_budget` must be at most"),
     ({"disk_budget": 1e300}, "`disk_budget` must be at most")],
)
def test_constructor_validation_names_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetCallback(**kwargs)


@pytest.mark.parametrize("name", ["include_embedding", "overwrite", "fsync", "verbose"])
@pytest.mark.parametrize("value", ["False", "no", 0, 1, None])
def test_booleans_must_be_bools(name, value):
    """`overwrite="False"` used to be taken as true."""
    with pytest.raises(ValueError, match=rf"`{name}` must be True or False \(a bool\), got {value!r}"):
        BudgetCallback(**{name: value})


def test_snapshot_dir_is_resolved_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cb = BudgetCallback("runs/../snaps")
    monkeypatch.chdir("/")
    assert cb.snapshot_dir == tmp_path / "snaps" and cb.snapshot_dir.is_absolute()
    assert cb.state_key == BudgetCallback(str(tmp_path / "snaps")).state_key
    assert os.fspath(tmp_path) in cb.state_key


def test_sizes_take_si_and_iec_units():
    cb = BudgetCallback(disk_budget="1.5GiB", memory_budget="12GB", wandb_budget=1000)
    assert (cb.config.disk_budget, cb.config.memory_budget, cb.config.wandb_budget) == (1_610_612_736, 12 * 10**9, 1000)
