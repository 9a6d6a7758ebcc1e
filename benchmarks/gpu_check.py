"""GPU checks: every measurement that needs CUDA, in one command (issue 10, item 8).

1. Memory forecast vs CUDA. GPT-2 small/medium/large/xl (``budget_callback.models.gpt.GPT``), micro-batch
   B in 1..32 (larger B skipped once one runs out of memory), T=1024, bf16-mixed (CUDA autocast, fp32
   master weights), flash attention (SDPA forced to its flash kernel), AdamW fused and foreach, eager and
   ``torch.compile(model)``. Steps in Lightning's order (forward with the last step's gradients alive,
   ``zero_grad(set_to_none=True)``, backward, ``opt.step()``): warm-up steps (optimizer state, compilation),
   ``torch.cuda.reset_peak_memory_stats()``, one real step, then ``torch.cuda.max_memory_allocated()`` and
   ``memory_reserved()``. Against (a) the traced forecast (``trace_training_step_memory`` /
   ``trace_compiled_training_step_memory`` on the real module and optimizer -> ``peak_memory_from_trace``), on
   the fake cuda device the callback uses where CUDA is present, and on the fake cpu device beside it (the
   compiled partition differs by device), and (b) the analytic one (``peak_memory``; compiled: the whole model is
   compiled, its graph returns the logits too, hence ``keep_logits=True``).
   **Target: each forecast within 10% of max_memory_allocated.** The CUDA context (a few hundred MiB) is
   in neither; "device used" (``mem_get_info``: total - free) shows it.
2. Real Trainer runs (bf16-mixed, one GPU) with ``BudgetCallback``: single device (snapshot float32 and
   bfloat16), ``FSDPStrategy`` (FSDP1) and ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2). Checks:
   the last snapshot equals the model's W after the last step bit for bit (W cast to the snapshot dtype);
   ``cb.bytes_written == cb.projected_bytes ==`` the .safetensors bytes on disk; the capture path used
   (pinned ring + CUDA event, or the CPU copier thread); the fit-start forecast's peak vs
   ``max_memory_allocated()`` over the run (reported, no target: the run adds the snapshot capture).

    python benchmarks/gpu_check.py                  # everything (GPU); writes benchmarks/results/gpu_check.md
    python benchmarks/gpu_check.py --quick          # gpt2 small, B in 1, 8 (+ the Trainer runs)
    python benchmarks/gpu_check.py --part memory --models gpt2-xl --batches 1,2   # a slice
    python benchmarks/gpu_check.py --smoke-on-cpu --out /work/scratch/gpucheck/smoke.md   # plumbing, on the CPU

Without CUDA (and without --smoke-on-cpu) it prints one line and exits 0, writing nothing. The smoke run
takes the same code paths on the CPU at tiny sizes (FSDPStrategy skipped: Lightning refuses it on the CPU)
with a stand-in for max_memory_allocated (torch.profiler's memory events: peak tensor bytes).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, log, mib, table, tmp_dir, verdict, write_section  # noqa: E402

from budget_callback.forecast.memory import TrainSetup, peak_memory, peak_memory_from_trace  # noqa: E402
from budget_callback.forecast.shapes import ModelShape, preset  # noqa: E402
from budget_callback.models.gpt import GPT, Block  # noqa: E402

TARGET = 0.10
MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
BATCHES = (1, 2, 4, 8, 16, 32)
TINY = ModelShape(vocab_size=512, d_model=64, n_layer=2, n_head=2, n_ctx=64, name="smoke-tiny")
warnings.filterwarnings("ignore")


# --- device-specific: the only places that name CUDA -------------------------------------------------------
def device_lines(dev: torch.device) -> list[str]:
    if dev.type != "cuda":
        return ["- Device: **CPU smoke run** (`--smoke-on-cpu`): no CUDA here; the figures prove the plumbing, "
                "they are not GPU figures. Measured column: torch.profiler memory events (peak tensor bytes), "
                f"a stand-in for `torch.cuda.max_memory_allocated()`; torch {torch.__version__}."]
    p = torch.cuda.get_device_properties(dev)
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        drv = "unknown (no nvidia-smi)"
    return [f"- Device: {torch.cuda.get_device_name(dev)}, {p.total_memory / 2**30:.1f} GiB, "
            f"compute capability {p.major}.{p.minor}, {torch.cuda.device_count()} visible",
            f"- NVIDIA driver {drv}; torch {torch.__version__} (CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()})"]


def release(dev: torch.device, compiled: bool = False) -> None:
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def allocated(dev: torch.device) -> int:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


def device_total(dev: torch.device) -> int | None:
    return torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None


def measure_step(dev: torch.device, step, before: int) -> dict:
    """Run ``step()`` once; its peak: CUDA's allocator counters, or on the CPU the profiler's memory events
    (``before``: tensor bytes alive when it starts) as a stand-in."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        free, total = torch.cuda.mem_get_info(dev)
        return {"peak": torch.cuda.max_memory_allocated(dev), "reserved": torch.cuda.memory_reserved(dev),
                "used": total - free}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                       if e.name() == "[memory]"):
        running += n
        peak = max(peak, running)
    return {"peak": before + peak, "reserved": None, "used": None}


def run_peak_start(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def run_peak(dev: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


# --- shared ---------------------------------------------------------------------------------------------
def flash():
    """SDPA restricted to its flash kernel (CUDA's flash-attention; the CPU has its own flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def err(forecast: int, measured: int) -> str:
    return f"{(forecast - measured) / measured * 100:+.1f}%"


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def within(forecast: int, measured: int) -> bool:
    return abs(forecast - measured) <= TARGET * measured


def loss_fn(model, batch):
    return model(batch[0], batch[1])[1]


def live_bytes(*trees) -> int:
    from budget_callback.lightning.tracing import _storage_bytes

    return _storage_bytes(trees)


def memory_case(dev, shape: ModelShape, B: int, T: int, compiled: bool, impl: str, warmup: int = 2) -> dict:
    """Forecasts (analytic, traced on the real module) then one measured real step; OOM -> ``measured="OOM"``."""
    from budget_callback.lightning.tracing import trace_training_step_memory
    from budget_callback.lightning.tracing_compiled import trace_compiled_training_step_memory

    setup = TrainSetup(B, seq_len=T, precision="bf16-mixed", optimizer="adamw", optimizer_impl=impl,
                       flash_attention=True, compile=compiled, keep_logits=compiled)
    out = {"analytic": peak_memory(shape, setup)["peak_bytes"], "start": allocated(dev)}
    torch.manual_seed(0)
    model = GPT(shape).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **{impl: True})
    run = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(0)
    batch = tuple(torch.randint(0, shape.vocab_size, (B, T), generator=g).to(dev) for _ in range(2))
    tracer = trace_compiled_training_step_memory if compiled else trace_training_step_memory
    # the fake device the callback uses here: cuda where CUDA is present (inductor's CUDA partition), and the
    # cpu one beside it for comparison
    for key, fake in (("traced", "cuda"), ("traced_cpu", "cpu")) if dev.type == "cuda" else (("traced", "cpu"),):
        try:  # a forecast that fails is reported; the measurement still runs
            trace = tracer(run, batch, loss_fn, optimizer=opt, autocast_dtype=torch.bfloat16, device=fake)
            out[key] = peak_memory_from_trace(trace, setup)["peak_bytes"]
        except Exception as exc:  # noqa: BLE001
            out[key] = "error: " + short(exc)

    def step():  # Lightning's order: training_step with the last step's gradients alive, zero_grad, backward
        with flash(), torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = loss_fn(run, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        del loss
        opt.step()

    try:
        for _ in range(warmup):
            step()
        gc.collect()
        before = live_bytes(list(model.parameters()), list(model.buffers()), list(opt.state.values()), batch,
                            [p.grad for p in model.parameters()])
        out.update(measure_step(dev, step, before))
    except torch.OutOfMemoryError:
        out["peak"] = "OOM"
    return out


def memory_rows(dev, models, batches, T: int) -> list[list]:
    rows, total = [], device_total(dev)
    for name in models:
        shape = TINY if name == TINY.name else preset(name)
        for compiled in (False, True):
            for impl in ("fused", "foreach"):
                label = f"{name}, {'compiled' if compiled else 'eager'}, AdamW {impl}"
                oom_at = None
                for B in batches:
                    setup = TrainSetup(B, seq_len=T, precision="bf16-mixed", optimizer_impl=impl,
                                       flash_attention=True, compile=compiled, keep_logits=compiled)
                    analytic = peak_memory(shape, setup)["peak_bytes"]
                    if oom_at is not None:
                        rows.append([label, B, f"skipped (B={oom_at} OOM)", "—", "—", "—", "—", mib(analytic),
                                     "—", "n/a", "—"])
                        continue
                    t0 = time.perf_counter()
                    try:
                        r = memory_case(dev, shape, B, T, compiled, impl)
                    except Exception as exc:  # noqa: BLE001 - the row says what failed
                        r = {"error": short(exc)}
                    release(dev, compiled)
                    secs = time.perf_counter() - t0
                    rows.append(memory_row(label, B, r, analytic, total, secs))
                    if r.get("peak") == "OOM":
                        oom_at = B
                    log(f"{label} B={B}: " + " | ".join(str(c) for c in rows[-1][2:]))
    return rows


def memory_row(label: str, B: int, r: dict, analytic: int, total: int | None, secs: float) -> list:
    if "error" in r:
        return [label, B, f"error: {r['error']}", "—", "—", "—", "—", mib(analytic), "—", "n/a", f"{secs:.0f}"]
    leak = f" (at start {mib(r['start'])} still allocated)" if r["start"] > 2**20 else ""
    t = r["traced"] if isinstance(r["traced"], int) else None
    traced = mib(t) if t is not None else r["traced"]
    if "traced_cpu" in r:
        cpu = r["traced_cpu"]
        traced += f" (cpu fake: {mib(cpu) if isinstance(cpu, int) else cpu})"
    if r["peak"] == "OOM":
        says = "forecast > device memory" if total and min(t or analytic, analytic) > total else \
            "forecast fits the device"
        return [label, B, "OOM" + leak, "—", "—", traced, "—", mib(analytic), "—", f"OOM ({says})", f"{secs:.0f}"]
    m = r["peak"]
    reserved = mib(r["reserved"]) if r["reserved"] is not None else "—"
    used = mib(r["used"]) if r["used"] is not None else "—"
    return [label, B, mib(m) + leak, reserved, used, traced, err(t, m) if t is not None else "—", mib(analytic),
            err(analytic, m), verdict(within(t, m) if t is not None else None) + " / " + verdict(within(analytic, m)),
            f"{secs:.0f}"]


# --- Trainer runs -------------------------------------------------------------------------------------------
def trainer_classes():
    import lightning as L

    class SnapLM(L.LightningModule):
        """A GPT from a ModelShape (the callback recognises ``model.shape``: analytic forecast)."""

        def __init__(self, shape: ModelShape, fsdp2: bool = False) -> None:
            super().__init__()
            self.model = GPT(shape)
            self.fsdp2 = fsdp2

        def configure_model(self):  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            if self.fsdp2:
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for block in self.model.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            return self.model(batch[0], batch[1])[1]

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class LastW(L.Callback):
        """W as (V, D) after the last step, whole (FSDP1: summon_full_params; FSDP2: full_tensor), on the host."""

        def on_train_end(self, trainer, pl_module):
            self.step = trainer.global_step
            w = pl_module.model.lm_head.weight
            if hasattr(w, "full_tensor"):
                self.w = w.detach().full_tensor().cpu()
                return
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            root = trainer.strategy.model
            if any(isinstance(m, FSDP) for m in root.modules()):
                with FSDP.summon_full_params(root, writeback=False):
                    self.w = pl_module.model.lm_head.weight.detach().cpu().clone()
            else:
                self.w = w.detach().cpu().clone()

    return SnapLM, LastW


def loader(vocab: int, seq: int, batch: int, n: int):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=batch)


def capture_path(cb) -> str:
    """How the snapshots were copied (``CaptureStats.path``: the pinned ring + CUDA event when W is on CUDA, else
    the copier thread or a guarded copy), and whether the ring really is pinned."""
    cap = getattr(cb._fit, "capture", None) if cb._fit is not None else None
    if cap is None:
        return "no capture"
    ws = [source.get() for source in cap.sources.values()]
    cuda = any(w.device.type == "cuda" for w in ws)
    pinned = [image.buffer.is_pinned() for image in cap._ring]
    s = cap.stats
    how = s.path + ("" if not cuda or (pinned and all(pinned)) else ", but the ring is NOT pinned")
    return (f"{how} (W: {type(ws[0]).__name__} on {ws[0].device.type}; ring {len(pinned)}, pinned {sum(pinned)}; "
            f"taken {s.taken}, waits {s.waits}, dropped {s.dropped}, copy waits {s.copy_waits}, torn {s.torn})")


def trainer_case(dev, shape: ModelShape, B: int, T: int, steps: int, strategy, dtype: str, fsdp2: bool,
                 root: Path) -> dict:
    import lightning as L

    from budget_callback import BudgetCallback, SnapshotReader

    SnapLM, LastW = trainer_classes()
    snaps = root / "snaps"
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    cb, last = BudgetCallback(snaps, snapshot_dtype=dtype, verbose=False, overwrite=True), LastW()
    trainer = L.Trainer(accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=steps, strategy=strategy, callbacks=[cb, last], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(root))
    release(dev)
    run_peak_start(dev)
    trainer.fit(SnapLM(shape, fsdp2), loader(shape.vocab_size, T, B, B * steps))
    measured = run_peak(dev)
    reader = SnapshotReader(snaps)
    stored = reader.load(reader.steps[-1])
    want = last.w.to(stored.dtype)
    on_disk = sum(f.stat().st_size for f in snaps.glob("*.safetensors"))
    out = {"last": reader.steps[-1], "step": last.step, "n": len(reader.steps),
           "equal": stored.dtype == getattr(torch, dtype) and torch.equal(stored, want),
           "bytes": (cb.bytes_written, cb.projected_bytes, on_disk), "path": capture_path(cb),
           "forecast": cb.forecast.memory["peak_bytes"], "measured": measured}
    del trainer
    shutil.rmtree(root, ignore_errors=True)
    return out


def trainer_rows(dev, shape: ModelShape, B: int, T: int, steps: int) -> list[list]:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    runs = [("single device", lambda: "auto", "float32", False),
            ("single device", lambda: "auto", "bfloat16", False),
            ("FSDPStrategy (FSDP1, blocks wrapped)", lambda: FSDPStrategy(auto_wrap_policy={Block}), "float32", False),
            ("ModelParallelStrategy + fully_shard (FSDP2)", lambda: ModelParallelStrategy(), "float32", True)]
    rows = []
    for name, strategy, dtype, fsdp2 in runs:
        t0 = time.perf_counter()
        if "FSDP1" in name and dev.type != "cuda":
            rows.append([name, dtype, "skipped on the CPU: Lightning refuses FSDPStrategy without a GPU "
                         "(accelerator_connector: 'requires a GPU accelerator')"] + ["—"] * 6)
            log(f"trainer {name}: skipped on the CPU")
            continue
        try:
            r = trainer_case(dev, shape, B, T, steps, strategy(), dtype, fsdp2, tmp_dir("gpu_check") / "trainer")
            written, projected, on_disk = r["bytes"]
            m = r["measured"]
            rows.append([name, dtype, f"{r['n']} snapshots, last step {r['last']} (trainer {r['step']}): "
                         + verdict(r["equal"] and r["last"] == r["step"]),
                         f"{written:,} / {projected:,} / {on_disk:,} B: " + verdict(written == projected == on_disk),
                         r["path"], mib(r["forecast"]), mib(m) if m is not None else "— (CPU)",
                         err(r["forecast"], m) if m is not None else "—", f"{time.perf_counter() - t0:.0f}"])
        except Exception as exc:  # noqa: BLE001 - the row says what failed
            rows.append([name, dtype, "error: " + short(exc)] + ["—"] * 6)
        release(dev)
        log(f"trainer {name} ({dtype}): " + " | ".join(str(c) for c in rows[-1][2:]))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rows


# --- the section -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="gpt2 small only, B in 1, 8")
    p.add_argument("--models", help="comma-separated presets (default: the GPT-2 family)")
    p.add_argument("--batches", help="comma-separated micro-batches (default: 1,2,4,8,16,32)")
    p.add_argument("--part", choices=["all", "memory", "trainer"], default="all")
    p.add_argument("--smoke-on-cpu", action="store_true", help="same code paths on the CPU at tiny sizes")
    p.add_argument("--out", help="write the section here instead of benchmarks/results/gpu_check.md")
    args = p.parse_args(argv)
    if not args.smoke_on_cpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}): nothing to measure; every GPU row in "
              "BENCHMARKS.md stays 'not measured on GPU yet'")
        return 0
    dev = torch.device("cpu") if args.smoke_on_cpu else torch.device("cuda", torch.cuda.current_device())
    if args.smoke_on_cpu:
        models, batches, T = [TINY.name], [1, 2], 64
        trainer_setup = (TINY, 2, 64, 4)
    else:
        models = ["gpt2"] if args.quick else list(MODELS)
        batches, T = ([1, 8] if args.quick else list(BATCHES)), 1024
        trainer_setup = (preset("gpt2", n_layer=2), 4, 256, 8)
    models = args.models.split(",") if args.models else models
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    t_start = time.perf_counter()
    log(f"gpu_check on {dev}: models {models}, B {batches}, T={T}, part {args.part}")

    smoke = " (CPU smoke run: plumbing only, not GPU figures)" if dev.type != "cuda" else ""
    cmd = f"`{' '.join([PY, 'benchmarks/gpu_check.py'] + (argv if argv is not None else sys.argv[1:]))}`"
    md = [f"## 5. GPU checks: memory forecast vs CUDA, snapshots from real GPU runs{smoke}", "",
          *device_lines(dev), ""]
    if args.part in ("all", "memory"):
        rows = memory_rows(dev, models, batches, T)
        md += [f"**Memory forecast vs CUDA. Target: each forecast within {TARGET:.0%} of "
               "`torch.cuda.max_memory_allocated()` of the measured step.** "
               f"T={T}, bf16-mixed (autocast bf16, fp32 weights), SDPA forced to flash, `AdamW(fused=True)` or "
               "`(foreach=True)`; eager or `torch.compile(model)` (default mode); 2 warm-up steps, "
               "`zero_grad(set_to_none=True)`, `reset_peak_memory_stats()`, one step (forward, loss, backward, "
               "`opt.step()`). Traced: `trace_training_step_memory` / `trace_compiled_training_step_memory` on the "
               "real module and optimizer, autocast bf16 -> `peak_memory_from_trace`. Analytic: `peak_memory(shape, "
               "TrainSetup(B, seq_len=T, precision='bf16-mixed', optimizer_impl=..., flash_attention=True, "
               "compile=..., keep_logits=compile))` (the compiled graph returns the logits too). Reserved and "
               "device used (`mem_get_info`: total - free, with the CUDA context and anything else on the "
               "device) are reported, not judged. Once a B runs out of memory the larger ones are skipped.", "",
               table(["case", "B", "max_memory_allocated", "memory_reserved", "device used after the step",
                      "traced forecast", "error", "analytic forecast", "error", "within 10% (traced / analytic)", "s"],
                     rows), ""]
    if args.part in ("all", "trainer"):
        shape, B, Tt, steps = trainer_setup
        rows = trainer_rows(dev, shape, B, Tt, steps)
        md += [f"**Trainer runs with snapshots.** `Trainer(devices=1, precision='bf16-mixed', max_steps={steps})`, "
               f"a GPT ({shape.name}: V={shape.vocab_size:,}, D={shape.d_model}, L={shape.n_layer}) at B={B}, "
               f"T={Tt}, AdamW defaults, `BudgetCallback(dir, snapshot_dtype=...)`. Last snapshot vs W after the "
               "last step (FSDP1: `summon_full_params`; FSDP2: `full_tensor()`), cast to the snapshot dtype, "
               "`torch.equal`. Capture path read from the callback's capture (ring buffers' `is_pinned()`, "
               "whether its copier thread ran, `CaptureStats`). Forecast: the fit-start `cb.forecast.memory"
               "['peak_bytes']` vs `max_memory_allocated()` over the whole fit (reported, no target).", "",
               table(["run", "snapshot dtype", "last snapshot == W, bit for bit", "written / projected / on disk",
                      "capture path", "fit-start forecast peak", "max_memory_allocated (run)", "error", "s"],
                     rows), ""]
    log(f"gpu_check done in {time.perf_counter() - t_start:.0f} s")
    text = "\n".join(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text.rstrip() + f"\n\n_Measured {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {cmd}._\n")
        log(f"wrote {out}")
    else:
        write_section("gpu_check", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
