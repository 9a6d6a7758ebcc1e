"""Benchmark 2a/2b: forecast bytes vs bytes on disk (snapshots: exact; checkpoints: within 1%).

Snapshots: SnapshotWriter (the callback's writer, fsync on) writes real files for several
shapes, dtypes, stacking (snapshots_per_file), intervals crossing a digit boundary of the step
number, and W+E; the forecast is snapshots.schedule.series_bytes / SnapshotLayout.file_bytes. Two rows go through
a real Trainer with BudgetCallback (cb.projected_bytes vs the files). Checkpoints: Lightning's
ModelCheckpoint writes a .ckpt next to BudgetCallback; the forecast is
cb.forecast.storage["checkpoint_bytes"].

    python benchmarks/forecast_bytes.py      # ~1 min here
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, table, tmp_dir, verdict, write_section  # noqa: E402
from models import ShapeLM, token_loader, trainer  # noqa: E402

from budget_callback import BudgetCallback  # noqa: E402
from budget_callback.lightning.inputs import module_params  # noqa: E402
from budget_callback.forecast.shapes import ModelShape  # noqa: E402
from budget_callback.snapshots.format import SnapshotLayout  # noqa: E402
from budget_callback.snapshots.image import FileImage  # noqa: E402
from budget_callback.snapshots.schedule import Schedule, series_bytes  # noqa: E402
from budget_callback.snapshots.series import Series  # noqa: E402
from budget_callback.snapshots.writer import SnapshotWriter  # noqa: E402

warnings.filterwarnings("ignore")
CMD = "`python benchmarks/forecast_bytes.py`"


def files_on_disk(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.glob("step_*.safetensors"))}


def writer_case(V, D, dtype, K, every, steps, include_embedding=False) -> list:
    layout = SnapshotLayout(V, D, dtype, K, include_embedding, tied=False)
    d = tmp_dir("forecast_bytes") / "snap"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    series = Series(d, layout, "bench", Schedule.start(layout, every))
    w = SnapshotWriter(series)
    w.start()
    t = torch.randn(V, D).to(getattr(torch, dtype))
    for step in range(1, steps + 1):
        placement = series.place(step)
        if placement is not None:
            image = FileImage(layout)  # the host buffer laid out as the file, as the capture fills it
            for view in image.prepare(placement.step, placement.every).values():
                view.copy_(t)
            w.submit(placement, image)
    w.close()
    on_disk = files_on_disk(d)
    # per-file forecast: the file starting at step s holds min(K, remaining) snapshots
    snaps = list(range(every, steps + 1, every))
    per_file = {}
    for i in range(0, len(snaps), K):
        group = snaps[i:i + K]
        per_file[f"step_{group[0]:09d}.safetensors"] = layout.file_bytes(group[0], len(group), every)
    forecast = series_bytes(layout, steps, every)
    actual = sum(on_disk.values())
    worst = max(abs(on_disk.get(n, 0) - b) for n, b in per_file.items())
    names_match = set(per_file) == set(on_disk)
    shutil.rmtree(d, ignore_errors=True)
    what = f"{V:,} x {D:,} {dtype}, K={K}, every {every}, steps {steps}" + (", W+E" if include_embedding else "")
    ok = forecast == actual and worst == 0 and names_match
    return [what, len(on_disk), f"{forecast:,}", f"{actual:,}", f"{actual - forecast:+,}", worst, "0 B", verdict(ok), CMD]


def callback_case(shape: ModelShape, K: int, steps: int, include_embedding: bool) -> list:
    root = tmp_dir("forecast_bytes") / "cb"
    shutil.rmtree(root, ignore_errors=True)
    cb = BudgetCallback(root / "snapshots", 1, "bfloat16", K, include_embedding=include_embedding, verbose=False)
    trainer(root, [cb], steps).fit(ShapeLM(shape, log_loss=False), token_loader(shape.vocab_size, shape.n_ctx, 64, 4))
    actual = sum(files_on_disk(root / "snapshots").values())
    forecast = cb.projected_bytes
    what = (f"Trainer + BudgetCallback: {shape.vocab_size:,} x {shape.d_model} bf16, K={K}, {steps} steps"
            + (", W+E untied" if include_embedding else ""))
    ok = forecast == actual == cb.bytes_written
    return [what, len(files_on_disk(root / "snapshots")), f"{forecast:,}", f"{actual:,}", f"{actual - forecast:+,}",
            "—", "0 B", verdict(ok), CMD]


def checkpoint_case(shape: ModelShape, optimizer: str = "adamw") -> list:
    root = tmp_dir("forecast_bytes") / "ckpt"
    shutil.rmtree(root, ignore_errors=True)
    cb = BudgetCallback(root / "snapshots", 1, verbose=False)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=1)
    module = ShapeLM(shape, optimizer, log_loss=False)
    trainer(root, [cb, ckpt], 2, enable_checkpointing=True).fit(module, token_loader(shape.vocab_size, shape.n_ctx, 32, 2))
    files = list((root / "ckpt").glob("*.ckpt"))
    assert len(files) == 1, files
    actual = files[0].stat().st_size
    forecast = cb.forecast.storage["checkpoint_bytes"]
    counts = module_params(module)
    err = (forecast - actual) / actual
    what = (f"V={shape.vocab_size:,} D={shape.d_model} L={shape.n_layer}{'' if shape.tied else ' untied'}, {optimizer}"
            f"{' (momentum 0.9)' if optimizer == 'sgd' else ''}: {counts['total']:,} params, {counts['tensors']} tensors")
    return [what, f"{forecast:,}", f"{actual:,}", f"{actual - forecast:+,}", f"{err * 100:+.3f}%", "within 1%",
            verdict(abs(err) <= 0.01), CMD]


def main() -> int:
    snap_rows = []
    cases = [
        (7, 3, "float32", 1, 1, 12), (128, 64, "bfloat16", 1, 1, 12), (128, 64, "float16", 4, 1, 12),
        (1_000, 33, "float32", 3, 7, 100), (10_000, 64, "bfloat16", 1, 3, 40), (10_000, 64, "bfloat16", 5, 1, 23),
        (10_000, 64, "float32", 2, 1, 11), (50_257, 768, "bfloat16", 1, 4, 12),
    ]
    for c in cases:
        log("snapshot case", c)
        snap_rows.append(writer_case(*c))
    log("snapshot case W+E")
    snap_rows.append(writer_case(1_000, 64, "bfloat16", 3, 1, 10, include_embedding=True))
    shape = ModelShape(vocab_size=500, d_model=16, n_layer=1, n_head=2, n_ctx=8, tied=False, name="untied")
    for K, emb in ((1, False), (3, True)):
        log("callback case", K, emb)
        snap_rows.append(callback_case(shape, K, 11, emb))

    ckpt_rows = []
    shapes = [
        ModelShape(vocab_size=50, d_model=8, n_layer=1, n_head=2, n_ctx=8),
        ModelShape(vocab_size=10_000, d_model=64, n_layer=2, n_head=2, n_ctx=64),
        ModelShape(vocab_size=10_000, d_model=64, n_layer=2, n_head=2, n_ctx=64, tied=False),
        ModelShape(vocab_size=10_000, d_model=256, n_layer=4, n_head=4, n_ctx=64),
        ModelShape(vocab_size=50_257, d_model=768, n_layer=2, n_head=12, n_ctx=64),
    ]
    for s in shapes:
        log("checkpoint case", s.vocab_size, s.d_model, s.n_layer, s.tied)
        ckpt_rows.append(checkpoint_case(s))
    log("checkpoint case sgd")
    ckpt_rows.append(checkpoint_case(shapes[1], "sgd"))

    snap_ok = all("pass" in r[7] for r in snap_rows)
    ckpt_ok = all("pass" in r[6] for r in ckpt_rows)
    md = "\n".join([
        "## 2a. Snapshot bytes: forecast vs files on disk",
        "",
        "Forecast: `snapshots.schedule.series_bytes(layout, steps, every)` (whole series) and `file_bytes(first_step, count, every)` "
        "(each file). Files written by `SnapshotWriter` (fsync on), sizes from `stat`. K = snapshots_per_file; a last "
        "partial stacked file is included where steps/every is not a multiple of K.",
        "",
        table(["case", "files", "forecast B", "on disk B", "difference", "worst file |diff| B", "target", "result",
               "command"], snap_rows),
        "",
        f"All snapshot rows exact: {'yes' if snap_ok else '**no**'}.",
        "",
        "## 2b. Checkpoint bytes: forecast vs Lightning's .ckpt",
        "",
        "`ModelCheckpoint(every_n_train_steps=2)` after 2 steps, fp32 (`32-true`), one file; forecast "
        "`cb.forecast.storage['checkpoint_bytes']` (= `budget_callback.forecast.checkpoint.checkpoint_bytes`). "
        "Deterministic sizes, one run per row.",
        "",
        table(["model", "forecast B", ".ckpt B", "difference", "error", "target", "result", "command"], ckpt_rows),
        "",
        f"All checkpoint rows within 1%: {'yes' if ckpt_ok else '**no**'}.",
    ])
    write_section("forecast_bytes", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
