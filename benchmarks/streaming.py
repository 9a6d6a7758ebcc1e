"""Benchmark 1: what streaming W to disk costs a training run (the writer and reader alone: snapshot_io.py).

(a) The example model (examples/train_tiny_gpt.py's TinyGPT: V=10,000, D=64, 2 layers, 2 heads,
    batch 16 x 64 tokens) with and without BudgetCallback (bf16 snapshot every step, fsync on),
    runs alternating; step time = time between consecutive optimizer steps, from a timing Callback,
    first steps excluded. Target: <= 1.03.
(b) The GPT-2 head (W = 50,257 x 768, 77 MB per bf16 snapshot) on a small body (1 layer, seq 64,
    batch 4, SGD), the disk keeping up, with and without, alternating. Target: <= 1.05.
(c) Training-thread time per snapshot: the callback's batch-end hook plus the wait in
    on_before_optimizer_step for the copy to have read W, in runs (a) and (b). Target: < 1 ms.
(d) Disk-bound: W as a sparse embedding (a step costs a few ms): the disk sets the pace; the
    back-pressure training sees is reported.

    python benchmarks/streaming.py            # ~18 min here
    python benchmarks/streaming.py --quick    # fewer runs, a smoke test
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, log, median, spread, table, tmp_dir, verdict, write_section  # noqa: E402

sys.path.insert(0, str(ROOT / "examples"))
from corpus import TokenWindows, load_corpus  # noqa: E402
from train_tiny_gpt import TinyGPT  # noqa: E402

from budget_callback import BudgetCallback  # noqa: E402
from budget_callback.forecast.shapes import ModelShape  # noqa: E402
from budget_callback.models.gpt import GPT  # noqa: E402

warnings.filterwarnings("ignore")


class StepTimer(L.Callback):
    """Wall time between consecutive optimizer steps (``on_before_optimizer_step`` to the next one). It does not
    override a hook that runs between a snapshot and the next optimizer step, so the callback's copies overlap
    the next step, as for a user with no such hook (``UserLogger`` below shows the other case)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.marks.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.marks[warmup:], self.marks[warmup + 1:])]


class UserLogger(L.Callback):
    """A read-only callback of the kind users write (it logs at every batch end): the callback cannot know it
    leaves W alone, so its copies are guarded (finished before the batch end returns)."""

    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1


def fit(module, loader, steps: int, callback: BudgetCallback | None, extra: list | None = None) -> StepTimer:
    timer = StepTimer()
    callbacks = ([callback] if callback else []) + [timer] + (extra or [])
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=str(tmp_dir("streaming/root")))
    trainer.fit(module, loader)
    return timer


def budget(directory: Path, **kwargs) -> BudgetCallback:
    """The callback as a user adds it; the time its hooks take on the training thread is recorded."""
    shutil.rmtree(directory, ignore_errors=True)
    cb = BudgetCallback(snapshot_dir=directory, save_every_n_steps=1, snapshot_dtype="bfloat16", overwrite=True,
                        verbose=False, **kwargs)
    cb.hook_seconds = []

    def timed(hook):
        def run(*args) -> None:
            t = time.perf_counter()
            hook(*args)
            cb.hook_seconds.append(time.perf_counter() - t)
        return run

    cb.on_train_batch_end = timed(cb.on_train_batch_end)
    cb.on_before_optimizer_step = timed(cb.on_before_optimizer_step)
    return cb


def per_snapshot(cb: BudgetCallback) -> float:
    """Median training-thread time per snapshot: batch-end hook + the next optimizer step's wait."""
    pairs = cb.hook_seconds  # alternating: batch end, then the next step's on_before_optimizer_step
    per = [pairs[i] + (pairs[i + 1] if i + 1 < len(pairs) else 0.0) for i in range(0, len(pairs), 2)]
    return median(per[5:] or per)


def alternate(pairs: int, run, control: bool = False) -> dict:
    """``pairs`` rounds of a run with the callback and one without, alternating which goes first. ``control``:
    each round also runs a second one without (an A/A pair: how far two identical runs differ here)."""
    out = {"with": [], "without": [], "ratios": [], "hook": [], "backpressure": [], "copy_waits": [], "again": [],
           "control": []}
    orders = [(True, False, None), (False, None, True), (None, True, False)] if control else [(True, False),
                                                                                             (False, True)]
    for i in range(pairs):
        for with_cb in orders[i % len(orders)]:  # rotate which goes first
            seconds, cb = run(bool(with_cb))
            out["with" if with_cb else "without" if with_cb is False else "again"].append(seconds)
            if cb is not None:
                out["hook"].append(per_snapshot(cb))
                out.setdefault("overlapped", []).append(cb._fit.capture.overlap)
                stats = cb._fit.capture.stats
                out["backpressure"].append(stats.backpressure_seconds)
                out["copy_waits"].append(stats.copy_wait_seconds)
                assert cb.bytes_written == cb.projected_bytes, cb.summary()
        out["ratios"].append(out["with"][-1] / out["without"][-1])
        if control:
            out["control"].append(out["again"][-1] / out["without"][-1])
        log(f"pair {i + 1}/{pairs}: with {out['with'][-1] * 1e3:.2f} ms, without {out['without'][-1] * 1e3:.2f} ms, "
            f"ratio {out['ratios'][-1]:.4f}, training-thread time per snapshot {out['hook'][-1] * 1e3:.3f} ms"
            + (f"; control (without again / without) {out['control'][-1]:.4f}" if control else ""))
    return out


# --- (a) the example model --------------------------------------------------------------------
def tiny_overhead(pairs: int, steps: int, warmup: int) -> dict:
    ids, _ = load_corpus(vocab_size=10_000)
    directory = tmp_dir("streaming") / "tiny"

    def run(with_cb: bool):
        torch.manual_seed(0)
        loader = DataLoader(TokenWindows(ids, 64), batch_size=16, shuffle=True, drop_last=True)
        cb = budget(directory, include_embedding=True) if with_cb else None  # as the example (tied: W once)
        return median(fit(TinyGPT(64), loader, steps, cb).step_times(warmup)), cb

    out = alternate(pairs, run, control=True)
    shutil.rmtree(directory, ignore_errors=True)
    return out


# --- (b) the GPT-2 head on a small body ---------------------------------------------------------
WIDE = ModelShape(vocab_size=50_257, d_model=768, n_layer=1, n_head=12, n_ctx=64, name="gpt2-head-small-body")


class WideHeadGPT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = GPT(WIDE)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.model(x, y)[1]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def wide_overhead(pairs: int, steps: int, warmup: int, user_callback: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, WIDE.vocab_size, (4 * steps, WIDE.n_ctx + 1), generator=g)
    directory = tmp_dir("streaming") / "wide"

    def run(with_cb: bool):
        torch.manual_seed(0)
        loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)
        cb = budget(directory, disk_budget="40GB") if with_cb else None
        extra = [UserLogger()] if user_callback else None
        seconds = median(fit(WideHeadGPT(), loader, steps, cb, extra).step_times(warmup))
        shutil.rmtree(directory, ignore_errors=True)
        return seconds, cb

    return alternate(pairs, run, control=not user_callback)


# --- (d) disk-bound -------------------------------------------------------------------------------
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

    def run(with_cb: bool):
        loader = DataLoader(TensorDataset(data), batch_size=8)
        cb = budget(directory, disk_budget="40GB", unembedding="emb.weight") if with_cb else None
        t0 = time.perf_counter()
        seconds = median(fit(SparseHead(), loader, steps, cb).step_times(warmup))
        if cb is not None:
            cb.mbs = cb.bytes_written / (time.perf_counter() - t0) / 1e6
        shutil.rmtree(directory, ignore_errors=True)
        return seconds, cb

    out = alternate(pairs, run)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    tiny_pairs, tiny_steps, warm = (2, 40, 5) if args.quick else (9, 100, 10)
    wide_pairs, wide_steps = (1, 12) if args.quick else (4, 30)
    sparse_pairs, sparse_steps = (1, 12) if args.quick else (2, 30)
    cmd = "`python benchmarks/streaming.py`"

    log(f"(a) TinyGPT with/without BudgetCallback: {tiny_pairs} pairs x {tiny_steps} steps")
    a = tiny_overhead(tiny_pairs, tiny_steps, warm)
    log(f"(b) GPT-2 head on a small body: {wide_pairs} pairs x {wide_steps} steps")
    b = wide_overhead(wide_pairs, wide_steps, 3)
    log(f"(b') the same with a user's read-only batch-end callback (copies guarded): {wide_pairs} pairs")
    g = wide_overhead(wide_pairs, wide_steps, 3, user_callback=True)
    log(f"(d) disk-bound: sparse 50,257 x 768 head, {sparse_pairs} pairs x {sparse_steps} steps")
    d = disk_bound(sparse_pairs, sparse_steps, 3)
    ra, rb, rd, rg = median(a["ratios"]), median(b["ratios"]), median(d["ratios"]), median(g["ratios"])
    assert all(a["overlapped"]) and all(b["overlapped"]) and not any(g["overlapped"]), "copy modes not as intended"
    hook = a["hook"] + b["hook"]
    rows = [
        ["(a) TinyGPT (V=10,000, D=64, L=2, H=2; batch 16 x 64): step time with / without callback (bf16 snapshot "
         f"every step, fsync) — {tiny_pairs} alternating pairs x {tiny_steps} steps, first {warm} excluded",
         f"{ra:.4f} ({(ra - 1) * 100:+.1f}%); with {median(a['with']) * 1e3:.2f} ms, without "
         f"{median(a['without']) * 1e3:.2f} ms", spread(a["ratios"], "{:.4f}"), "<= 1.03", verdict(ra <= 1.03), cmd],
        ["  (a) control: a second run without the callback / the first, in the same rounds (what two identical "
         "runs differ by here)", f"{median(a['control']):.4f}", spread(a["control"], "{:.4f}"), "reported", "n/a", cmd],
        [f"(b) GPT-2 head on a small body (V=50,257, D=768, L=1, batch 4 x 64, SGD; 77 MB bf16 per step, the disk "
         f"keeping up): step time with / without, {wide_pairs} alternating pairs x {wide_steps} steps",
         f"{rb:.4f} ({(rb - 1) * 100:+.1f}%); with {median(b['with']) * 1e3:.0f} ms, without "
         f"{median(b['without']) * 1e3:.0f} ms", spread(b["ratios"], "{:.4f}"), "<= 1.05", verdict(rb <= 1.05), cmd],
        ["  (b) control: a second run without the callback / the first, in the same rounds",
         f"{median(b['control']):.4f}", spread(b["control"], "{:.4f}"), "reported", "n/a", cmd],
        ["(c) training-thread time per snapshot (batch-end hook + the optimizer step's wait for the copy), runs of "
         "(a) and (b)", f"{median(hook) * 1e3:.3f} ms; (a) {median(a['hook']) * 1e3:.3f} ms, (b) "
         f"{median(b['hook']) * 1e3:.3f} ms", spread([x * 1e3 for x in hook], "{:.3f}") + " ms", "< 1 ms",
         verdict(median(hook) < 1e-3), cmd],
        ["  (b) copy still reading W when the optimizer step came (per run)",
         f"{median(b['copy_waits']) * 1e3:.1f} ms", spread([x * 1e3 for x in b["copy_waits"]], "{:.1f}") + " ms",
         "reported", "n/a", cmd],
        [f"(b') as (b) with a user's read-only callback overriding `on_train_batch_end` (copies guarded: finished "
         f"before the batch end returns), {wide_pairs} alternating pairs x {wide_steps} steps",
         f"{rg:.4f} ({(rg - 1) * 100:+.1f}%); training-thread time per snapshot {median(g['hook']) * 1e3:.1f} ms",
         spread(g["ratios"], "{:.4f}"), "none (reported)", "n/a", cmd],
        [f"(d) disk-bound: W = 50,257 x 768 as a sparse embedding (SGD, batch 8 x 16; a step costs a few ms), "
         f"{sparse_pairs} alternating pairs x {sparse_steps} steps", f"{rd:.1f}x; with {median(d['with']) * 1e3:.0f} ms, "
         f"without {median(d['without']) * 1e3:.1f} ms", spread(d["ratios"], "{:.1f}"), "none (the disk sets the pace)",
         "n/a", cmd],
        ["  (d) back-pressure per run (training waiting for a free buffer)", f"{median(d['backpressure']):.2f} s",
         spread(d["backpressure"], "{:.2f}") + " s", "reported", "n/a", cmd],
    ]
    notes = [""]
    if ra > 1.03:
        rc = median(a["control"])
        notes.append(f"**Target missed in (a)**: median slowdown {(ra - 1) * 100:.1f}%; the hooks take "
                     f"{median(a['hook']) * 1e3:.3f} ms of a {median(a['without']) * 1e3:.1f} ms step on the training "
                     f"thread; the rest is off it (the copier and writer threads share the 2 cores with training). "
                     f"Two identical runs without the callback differed by {(rc - 1) * 100:+.1f}% in the median "
                     f"(spread {spread(a['control'], '{:.4f}')}) in the same rounds: "
                     + ("the miss is within what this machine's noise produces." if abs(rc - 1) >= ra - 1 or
                        max(a["control"]) >= ra else "the miss is larger than that noise."))
    above = [i for i, r in enumerate(a["ratios"]) if r > max(a["control"])]
    if above:
        hook_ms = max(a["hook"][i] for i in above) * 1e3
        notes.append(f"In (a), {len(above)} of {len(a['ratios'])} pairs were slower with the callback than any control "
                     f"pair differed ({', '.join(format(a['ratios'][i], '.3f') for i in above)} against a control maximum "
                     f"of {max(a['control']):.3f}): an intermittent cost the median does not show. The training-thread "
                     f"time per snapshot in those runs was at most {hook_ms:.2f} ms, so the rest is off the training "
                     "thread (the copier's and writer's work, the file writes and fsyncs, sharing the 2 cores and the "
                     "disk with training).")
    if rb > 1.05:
        notes.append(f"**Target missed in (b)**: median slowdown {(rb - 1) * 100:.1f}%; the training thread spends "
                     f"{median(b['hook']) * 1e3:.3f} ms per snapshot; the copy of 77 MB and the write run off it, on the "
                     "2 cores training also uses. Two identical runs without the callback differed by "
                     f"{(median(b['control']) - 1) * 100:+.1f}% in the median (spread {spread(b['control'], '{:.4f}')}) "
                     "in the same rounds.")
    md = "## 1. Snapshot streaming overhead\n\n" + table(
        ["case", "median", "spread (min–max)", "target", "result", "command"], rows) + "\n" + "\n\n".join(notes)
    write_section("streaming", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
