"""FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) on two CPU processes with gloo: the fit-start forecast per
device, activations counted, against the real sharded step measured on each rank by the profiler."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch.strategies", reason="needs Lightning's ModelParallelStrategy")
from lightning.pytorch import strategies  # noqa: E402

if not hasattr(strategies, "ModelParallelStrategy"):
    pytest.skip("ModelParallelStrategy (FSDP2) needs Lightning >= 2.3", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys, json, os, warnings
    sys.path.insert(0, {tests!r})
    warnings.filterwarnings("ignore")
    import lightning as L, torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from budget_callback import BudgetCallback
    from helpers import LlamaLM, token_loader
    from step_probe import StepPeakProbe

    class Sharded(LlamaLM):
        def configure_model(self):
            for layer in self.layers:
                fully_shard(layer)
            fully_shard(self)

    probe = StepPeakProbe(2)
    cb = BudgetCallback({snaps!r}, verbose=False, memory_budget="1GiB")
    t = L.Trainer(max_steps=3, accelerator="cpu", devices=2, logger=False, callbacks=[probe, cb],
                  strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)
    t.fit(Sharded(vocab=512, d=64, layers=2), token_loader(vocab=512, seq=64, n=64, batch=4))
    m = cb.forecast.memory
    with open(os.path.join({root!r}, "rank" + os.environ.get("LOCAL_RANK", "0") + ".json"), "w") as fh:
        json.dump({{"forecast": m["peak_bytes"], "real": probe.peak_bytes, "method": m["activations_method"],
                    "activations": m["activations_bytes"], "params": m["params_bytes"],
                    "other": m["other_bytes"], "notes": cb.forecast.notes}}, fh)
""")


def test_fsdp2_forecast_per_device_equals_the_real_sharded_step(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), snaps=str(tmp_path / "s"), root=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # checked before reading what the ranks wrote
    ranks = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert set(ranks) == {"rank0", "rank1"}
    for rank in ranks.values():
        assert rank["method"].startswith("traced training step")  # was "not traced (... deepcopy)"
        assert rank["activations"] > rank["params"] > 0  # activations counted; parameters are this rank's shards
        assert rank["other"] > 0  # the root unit gathered whole
        assert abs(rank["forecast"] - rank["real"]) / rank["real"] < 0.03, rank
        assert any("FSDP2" in n for n in rank["notes"])
