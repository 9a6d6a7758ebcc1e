"""Benchmark 1: what streaming W to disk costs a training run.

(a) The example model (examples/train_tiny_gpt.py's TinyGPT: V=10,000, D=64, 2 layers, 2 heads,
    batch 16 x 64 tokens) trained for the same steps with and without BudgetCallback (bf16
    snapshot every step, fsync on), runs alternating; step time = time between consecutive
    optimizer steps, from a timing Callback, first steps excluded. Target: <= 3% slower.
(b) The GPT-2 head (W = 50,257 x 768, 77 MB per bf16 snapshot): SnapshotWriter alone (fsync on)
    vs a raw sequential write + fsync of the same bytes (same file sizes, same disk), alternating.
    Target: writer MB/s >= 0.8 x raw.
(c) Back-pressure: GPT with that head and a tiny body (1 layer, seq 16, SGD: cheap to train),
    with and without the callback, alternating; the writer cannot keep up, the queue fills and
    training waits (the writer's backpressure_seconds).

    python benchmarks/streaming.py            # ~4 min here
    python benchmarks/streaming.py --quick    # fewer runs, a smoke test
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, log, median, spread, table, timed_writer, tmp_dir, verdict, write_section  # noqa: E402

sys.path.insert(0, str(ROOT / "examples"))
from corpus import TokenWindows, load_corpus  # noqa: E402
from train_tiny_gpt import TinyGPT  # noqa: E402

from budget_callback import BudgetCallback  # noqa: E402
from budget_callback.models.gpt import GPT  # noqa: E402
from budget_callback.forecast.shapes import ModelShape  # noqa: E402
from budget_callback.snapshots.format import SnapshotLayout  # noqa: E402

warnings.filterwarnings("ignore")


class StepTimer(L.Callback):
    """Wall time between consecutive optimizer steps (on_train_batch_end to on_train_batch_end)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.marks.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.marks[warmup:], self.marks[warmup + 1:])]


def fit(module, loader, steps: int, callback: BudgetCallback | None) -> StepTimer:
    timer = StepTimer()
    callbacks = [callback, timer] if callback else [timer]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=str(tmp_dir("streaming/root")))
    trainer.fit(module, loader)
    return timer


def budget(directory: Path, **kwargs) -> BudgetCallback:
    """The callback as a user would add it; its batch-end hook (copy of W + submit + bookkeeping) is timed."""
    shutil.rmtree(directory, ignore_errors=True)
    cb = BudgetCallback(snapshot_dir=directory, save_every_n_steps=1, snapshot_dtype="bfloat16", overwrite=True,
                        verbose=False, **kwargs)
    cb.hook_seconds = []
    hook = cb.on_train_batch_end

    def timed(*args) -> None:
        t = time.perf_counter()
        hook(*args)
        cb.hook_seconds.append(time.perf_counter() - t)

    cb.on_train_batch_end = timed
    return cb


# --- (a) the example model --------------------------------------------------------------------
def tiny_overhead(pairs: int, steps: int, warmup: int) -> dict:
    ids, _ = load_corpus(vocab_size=10_000)
    directory = tmp_dir("streaming") / "tiny"
    ratios, with_med, without_med, bp, hook = [], [], [], [], []
    for i in range(pairs):
        for with_cb in ((True, False) if i % 2 == 0 else (False, True)):  # alternate which goes first
            torch.manual_seed(0)
            loader = DataLoader(TokenWindows(ids, 64), batch_size=16, shuffle=True, drop_last=True)
            cb = budget(directory, include_embedding=True) if with_cb else None  # as the example (tied: W once)
            times = fit(TinyGPT(64), loader, steps, cb).step_times(warmup)
            (with_med if with_cb else without_med).append(median(times))
            if cb:
                bp.append(cb._fit.capture.stats.backpressure_seconds)
                hook.append(median(cb.hook_seconds))
                assert cb.series.snapshots_on_disk == steps, cb.summary()
        ratios.append(with_med[-1] / without_med[-1])
        log(f"tiny pair {i + 1}/{pairs}: with {with_med[-1] * 1e3:.2f} ms, without {without_med[-1] * 1e3:.2f} ms, "
            f"ratio {ratios[-1]:.4f}")
    shutil.rmtree(directory, ignore_errors=True)
    return {"ratios": ratios, "with": with_med, "without": without_med, "backpressure": bp, "hook": hook}


# --- (b) writer vs raw write ------------------------------------------------------------------
def writer_vs_raw(reps: int, n: int, V: int = 50_257, D: int = 768) -> dict:
    layout = SnapshotLayout(V, D, "bfloat16")
    w = torch.randn(V, D).to(torch.bfloat16)
    root = tmp_dir("streaming") / "disk"
    sizes = [layout.file_bytes(s, 1, 1) for s in range(1, n + 1)]
    payload = os.urandom(max(sizes))
    writer_mbs, raw_mbs, ratios = [], [], []

    def run_writer() -> float:
        dt, written = timed_writer(root / "writer", layout, w, n)
        assert written == sum(sizes), (written, sum(sizes))
        return sum(sizes) / dt / 1e6

    def run_raw() -> float:
        d = root / "raw"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        view = memoryview(payload)
        t0 = time.perf_counter()
        for s, size in enumerate(sizes, 1):
            with open(d / f"raw_{s:09d}.bin", "wb") as fh:
                fh.write(view[:size])
                fh.flush()
                os.fsync(fh.fileno())
        dt = time.perf_counter() - t0
        shutil.rmtree(d, ignore_errors=True)
        return sum(sizes) / dt / 1e6

    for i in range(reps):
        order = (run_writer, run_raw) if i % 2 == 0 else (run_raw, run_writer)
        got = {f.__name__: f() for f in order}
        writer_mbs.append(got["run_writer"])
        raw_mbs.append(got["run_raw"])
        ratios.append(writer_mbs[-1] / raw_mbs[-1])
        log(f"disk rep {i + 1}/{reps}: writer {writer_mbs[-1]:.0f} MB/s, raw {raw_mbs[-1]:.0f} MB/s, ratio {ratios[-1]:.3f}")
    return {"writer": writer_mbs, "raw": raw_mbs, "ratios": ratios, "bytes": sum(sizes), "file": sizes[0]}


# --- (c) back-pressure with the GPT-2 head ----------------------------------------------------
WIDE = ModelShape(vocab_size=50_257, d_model=768, n_layer=1, n_head=12, n_ctx=16, name="gpt2-head-tiny-body")


class WideHeadGPT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = GPT(WIDE)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.model(x, y)[1]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def backpressure(pairs: int, steps: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, WIDE.vocab_size, (4 * steps, WIDE.n_ctx + 1), generator=g)
    directory = tmp_dir("streaming") / "wide"
    out = {"with": [], "without": [], "ratios": [], "bp": [], "bp_per_step": [], "mbs": [], "written": [], "hook": []}
    for i in range(pairs):
        for with_cb in ((True, False) if i % 2 == 0 else (False, True)):
            torch.manual_seed(0)
            loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=2)
            cb = budget(directory, disk_budget="40GB") if with_cb else None
            timer = fit(WideHeadGPT(), loader, steps, cb)
            times = timer.step_times(warmup)
            out["with" if with_cb else "without"].append(median(times))
            if cb:
                st = cb._fit.capture.stats
                # writer throughput while training: bytes over the time from the first step to the final flush
                elapsed = time.perf_counter() - timer.marks[0]
                out["bp"].append(st.backpressure_seconds)
                out["bp_per_step"].append(st.backpressure_seconds / steps)
                out["mbs"].append(cb.bytes_written / elapsed / 1e6)
                out["written"].append(cb.series.snapshots_on_disk)
                out["hook"].append(median(cb.hook_seconds))
                shutil.rmtree(directory, ignore_errors=True)
        out["ratios"].append(out["with"][-1] / out["without"][-1])
        log(f"wide pair {i + 1}/{pairs}: with {out['with'][-1] * 1e3:.0f} ms, without {out['without'][-1] * 1e3:.0f} ms, "
            f"back-pressure {out['bp'][-1]:.2f} s over {steps} steps")
    return out


class SparseHead(L.LightningModule):
    """W = 50,257 x 768 as a sparse embedding (SGD touches only the rows used): a step costs a few ms,
    so streaming 77 MB per step is limited by the disk, not by training."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(WIDE.vocab_size, WIDE.d_model, sparse=True)

    def training_step(self, batch, batch_idx):
        return self.emb(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def disk_bound(pairs: int, steps: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, WIDE.vocab_size, (8 * steps, 16), generator=g)
    directory = tmp_dir("streaming") / "sparse"
    out = {"with": [], "without": [], "ratios": [], "bp": [], "bp_per_step": [], "mbs": [], "hook": []}
    for i in range(pairs):
        for with_cb in ((True, False) if i % 2 == 0 else (False, True)):
            loader = DataLoader(TensorDataset(data), batch_size=8)
            cb = budget(directory, disk_budget="40GB", unembedding="emb.weight") if with_cb else None
            timer = fit(SparseHead(), loader, steps, cb)
            out["with" if with_cb else "without"].append(median(timer.step_times(warmup)))
            if cb:
                st = cb._fit.capture.stats
                elapsed = time.perf_counter() - timer.marks[0]
                out["bp"].append(st.backpressure_seconds)
                out["bp_per_step"].append(st.backpressure_seconds / steps)
                out["mbs"].append(cb.bytes_written / elapsed / 1e6)
                out["hook"].append(median(cb.hook_seconds))
                shutil.rmtree(directory, ignore_errors=True)
        out["ratios"].append(out["with"][-1] / out["without"][-1])
        log(f"sparse pair {i + 1}/{pairs}: with {out['with'][-1] * 1e3:.1f} ms, without {out['without'][-1] * 1e3:.1f} ms, "
            f"back-pressure {out['bp'][-1]:.2f} s over {steps} steps, writer {out['mbs'][-1]:.0f} MB/s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    tiny_pairs, tiny_steps, warm = (2, 40, 5) if args.quick else (5, 100, 10)
    disk_reps, disk_n = (2, 3) if args.quick else (10, 8)
    wide_pairs, wide_steps = (1, 15) if args.quick else (2, 30)
    sparse_pairs, sparse_steps = (1, 15) if args.quick else (3, 40)
    cmd = "`python benchmarks/streaming.py`"

    log(f"(a) TinyGPT with/without BudgetCallback: {tiny_pairs} pairs x {tiny_steps} steps")
    a = tiny_overhead(tiny_pairs, tiny_steps, warm)
    log(f"(b) writer vs raw write: {disk_reps} reps x {disk_n} snapshots of 50,257 x 768 bf16")
    b = writer_vs_raw(disk_reps, disk_n)
    log(f"(c) back-pressure with the GPT-2 head: {wide_pairs} pairs x {wide_steps} steps")
    c = backpressure(wide_pairs, wide_steps, 3)
    log(f"(d) disk-bound: sparse 50,257 x 768 head, {sparse_pairs} pairs x {sparse_steps} steps")
    d = disk_bound(sparse_pairs, sparse_steps, 3)
    rd = median(d["ratios"])

    ra, rb, rc = median(a["ratios"]), median(b["ratios"]), median(c["ratios"])
    rows = [
        ["TinyGPT (V=10,000, D=64, L=2, H=2; batch 16 x 64): step time with / without callback (bf16 snapshot every "
         f"step, fsync) — {tiny_pairs} alternating pairs x {tiny_steps} steps, first {warm} excluded",
         f"{ra:.4f} ({(ra - 1) * 100:+.1f}%); with {median(a['with']) * 1e3:.2f} ms, without {median(a['without']) * 1e3:.2f} ms",
         spread(a["ratios"], "{:.4f}"), "<= 1.03", verdict(ra <= 1.03), cmd],
        ["SnapshotWriter (fsync) / raw write+fsync, 50,257 x 768 bf16, "
         f"{disk_n} files of {b['file']:,} B per run, alternating",
         f"{rb:.3f}; writer {median(b['writer']):.0f} MB/s, raw {median(b['raw']):.0f} MB/s",
         spread(b["ratios"], "{:.3f}") + f"; writer {spread(b['writer'], '{:.0f}')} MB/s, raw {spread(b['raw'], '{:.0f}')} MB/s",
         ">= 0.8", verdict(rb >= 0.8), cmd],
        [f"GPT-2 head + tiny body (V=50,257, D=768, L=1, batch 2 x 16, SGD): step time with / without, "
         f"{wide_pairs} alternating pairs x {wide_steps} steps, queue_depth 4",
         f"{rc:.2f}x; with {median(c['with']) * 1e3:.0f} ms, without {median(c['without']) * 1e3:.0f} ms",
         spread(c["ratios"], "{:.2f}"), "none (reported)", "n/a", cmd],
        ["  same runs: back-pressure (the writer's backpressure_seconds) per run / per step",
         f"{median(c['bp']):.2f} s / {median(c['bp_per_step']) * 1e3:.0f} ms per step",
         spread(c["bp"], "{:.2f}") + " s", "reported", "n/a", cmd],
        ["  same runs: time in the callback's snapshot hook per step (bf16 copy of W + submit, training thread)",
         f"{median(c['hook']) * 1e3:.0f} ms", spread([x * 1e3 for x in c["hook"]], "{:.0f}") + " ms", "reported", "n/a", cmd],
        ["  same runs: writer throughput during training (bytes written / time from first step to last flush)",
         f"{median(c['mbs']):.0f} MB/s", spread(c["mbs"], "{:.0f}") + " MB/s", "reported", "n/a", cmd],
        [f"Disk-bound: W = 50,257 x 768 as a sparse embedding (SGD, batch 8 x 16; a step costs a few ms), "
         f"step time with / without, {sparse_pairs} alternating pairs x {sparse_steps} steps, queue_depth 4",
         f"{rd:.1f}x; with {median(d['with']) * 1e3:.0f} ms, without {median(d['without']) * 1e3:.1f} ms",
         spread(d["ratios"], "{:.1f}"), "none (the disk sets the pace)", "n/a", cmd],
        ["  same runs: back-pressure per run / per step (training waiting on the full queue)",
         f"{median(d['bp']):.2f} s / {median(d['bp_per_step']) * 1e3:.0f} ms per step",
         spread(d["bp"], "{:.2f}") + " s", "reported", "n/a", cmd],
        ["  same runs: snapshot hook per step (bf16 copy + submit, back-pressure included)",
         f"{median(d['hook']) * 1e3:.0f} ms", spread([x * 1e3 for x in d["hook"]], "{:.0f}") + " ms", "reported", "n/a", cmd],
        ["  same runs: writer throughput during training / raw write+fsync of (b)",
         f"{median(d['mbs']):.0f} MB/s = {median(d['mbs']) / median(b['raw']):.2f} of raw",
         spread(d["mbs"], "{:.0f}") + " MB/s", "reported", "n/a", cmd],
    ]
    notes = [
        "",
        f"Back-pressure in (a): {spread(a['backpressure'], '{:.3f}')} s per run; time in the snapshot hook "
        f"(copy of W to bf16 + submit) {median(a['hook']) * 1e3:.2f} ms per step (median of run medians).",
        f"Snapshots written in (c): {c['written']} of {wide_steps} per run (when_behind='wait': none dropped).",
    ]
    if ra > 1.03:
        notes.append(f"**Target missed in (a)**: median slowdown {(ra - 1) * 100:.1f}%. The snapshot hook itself takes "
                     f"{median(a['hook']) * 1e3:.2f} ms of a {median(a['without']) * 1e3:.1f} ms step; the rest is the "
                     "writer thread (serialisation, fsyncs) competing with training for the 2 cores.")
    if rc > 1:
        notes.append(f"In (c) the step is {rc:.2f}x slower with the callback: {median(c['hook']) * 1e3:.0f} ms per step "
                     "is the bf16 copy on the training thread; the rest is the writer thread and the kernel's writeback "
                     "competing with training for the 2 cores (back-pressure, i.e. waiting on a full queue, is "
                     f"{median(c['bp_per_step']) * 1e3:.0f} ms per step).")
    if rb < 0.8:
        notes.append(f"**Target missed in (b)**: the writer reaches {rb:.2f} of raw. Per snapshot the raw write does "
                     "one fsync; the writer does four (the file, the directory, then the manifest's atomic rewrite: "
                     "its temporary file and the directory again); that extra synchronous work is the difference "
                     "between the two code paths (the fsyncs were not timed separately).")
    md = "## 1. Snapshot streaming overhead\n\n" + table(
        ["case", "median", "spread (min–max)", "target", "result", "command"], rows) + "\n" + "\n".join(notes)
    write_section("streaming", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
