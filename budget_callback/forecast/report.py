"""Human-readable forecast report: the calculators' tables, itemised and right."""

from __future__ import annotations

from .engine import Forecast
from ..units import format_bytes, format_count, format_seconds


REPORT_TITLE = "budget-callback forecast"


def _table(title: str, rows: list[tuple[str, ...]], note: str = "") -> list[str]:
    """Rows of (label, value) or (label, value, why): the why in brackets after the value."""
    width = max([len(row[0]) for row in rows] + [24])
    lines = [title + (f"  ({note})" if note else "")]
    lines += [f"  {row[0]:<{width}}  {row[1]:>14}" + (f"  ({row[2]})" if len(row) > 2 else "") for row in rows]
    return lines + [""]


def _bytes_rows(parts: dict, keys: list[str] | None = None) -> list[tuple[str, str]]:
    keys = keys or [k for k in parts if isinstance(parts[k], int)]
    return [(k, format_bytes(parts[k])) for k in keys]


# the moments of a step in Lightning's order (its closure: training_step, zero_grad, backward; then the update)
_PHASE_NAMES = {
    "forward": "end of forward, last step's gradients alive",
    "forward_backward": "start of backward",
    "accumulate_forward": "accumulating micro-batch, forward",
    "accumulate_backward": "accumulating micro-batch, backward",
    "optimizer_step": "optimizer step",
    "snapshot_capture": "snapshot capture",
}


def _phase_name(key: str) -> str:
    return _PHASE_NAMES.get(key, key.replace("_", " "))


def render(f: Forecast) -> str:
    i, s = f.inputs, f.inputs.shape
    setup = i.setup
    strategy = setup.strategy if i.strategy_name is None else f"{i.strategy_name} (forecast as {setup.strategy})"
    run = (f"T={setup.seq(s):,}; {i.steps:,} steps, micro-batch {setup.micro_batch_size} x accum {setup.grad_accum} x "
           f"{setup.world_size} device(s), {setup.precision}, {setup.optimizer}, {strategy}")
    m = f.model
    if m is None:  # a declared shape: its architecture
        head = (f"{s.name}: V={s.vocab_size:,} D={s.d_model:,} L={s.n_layer} H={s.n_head}"
                f"{f' KV={s.kv_heads}' if s.kv_heads != s.n_head else ''}, {run}")
        tied = "tied weights once" if s.tied else "untied head"
    else:  # a traced module: what was found in it
        layers = f", {m['layers']} layers" if m.get("layers") else ""
        head = (f"{m['name']} (traced): {m['parameters']:,} parameters in {m['tensors']} tensors{layers}, "
                f"W {m['vocab_size']:,} x {m['hidden_dim']:,} {'tied to E' if m['tied'] else 'untied'}; {run}")
        tied = "shared tensors once"
    out = [head, ""]
    out += _table("Parameters", [(k, f"{v:,}") for k, v in f.params.items() if k != "total"]
                  + [("total", f"{f.params['total']:,}")], format_count(f.params["total"]) + ", " + tied)
    m = f.memory
    phase = m["phases"][m["peak_phase"]]
    out += _table(f"Memory per device at the peak ({_phase_name(m['peak_phase'])}), {m.get('mode', 'eager')} step",
                  _bytes_rows(phase, ["params", "gradients", "optimizer", "activations", "other", "total"]),
                  m["activations_method"])
    for name, other in m["phases"].items():
        if name != m["peak_phase"]:
            out.append(f"  other phase ({_phase_name(name)}): {format_bytes(other['total'])}")
    if m.get("budget_bytes") and not m.get("limits_known", True):
        out.append(f"  memory budget {format_bytes(m['budget_bytes'])}: largest micro-batch and fewest devices unknown "
                   "(the step could not be traced)")
    elif m.get("budget_bytes"):
        largest = m["max_batch_size"]
        largest = "none" if largest is None else (f"{largest:,}+" if largest >= 1 << 20 else f"{largest:,}")
        largest = f"largest micro-batch that fits {largest}" if m.get("largest_traced", True) else (
            "largest micro-batch not traced at fit start (a compiled step's slope costs two more compiles; "
            "`budget-callback plan --model ... --compile` gives it)")
        out.append(f"  memory budget {format_bytes(m['budget_bytes'])}: {largest}, "
                   f"fewest devices {m['min_devices'] if m['min_devices'] is not None else 'none under ' + setup.strategy}")
    out.append("")
    fl = f.flops
    out += _table("FLOPs", [(f"forward/{k}", format_count(v)) for k, v in fl["forward_per_sequence"].items() if k != "total"]
                  + [("forward per sequence", format_count(fl["forward_per_sequence"]["total"])),
                     ("train per step (fwd + 2x bwd)", format_count(fl["train_per_step"])),
                     ("PaLM 6N+12LHQT cross-check", format_count(fl["palm_per_step"])),
                     ("optimizer per step", format_count(fl["optimizer_per_step"])),
                     ("whole run", format_count(fl["train_total"]))], f"{fl['tokens_per_step']:,} tokens per step")
    t = f.time
    if t["gpu"]:
        out += _table(f"Time on {setup.world_size} x {t['gpu']}", [
            ("dense peak per device", format_count(t["peak_flops_per_device"]) + " FLOP/s"),
            ("assumed MFU", f"{t['mfu']:.0%}"),
            ("per optimizer step", format_seconds(t["step_seconds"])),
            ("whole run", format_seconds(t["train_seconds"]))])
    st = f.storage
    out += _table(f"Storage (snapshots every {f.save_every_n_steps} step(s), {i.snapshot.dtype})", [
        ("snapshot file", format_bytes(st["snapshot_file_bytes"])),
        ("snapshots", f"{st['snapshot_count']:,}"),
        ("per 1,000 steps", format_bytes(st["per_1000_steps_bytes"])),
        ("all snapshots (exact)", format_bytes(st["snapshot_bytes"])),
        ("one checkpoint", format_bytes(st["checkpoint_bytes"])),
        (f"checkpoints kept ({st['checkpoints_kept']})", format_bytes(st["checkpoints_bytes"])),
        ("W&B staging copies" + ("" if st["wandb_staging_on_disk_bytes"] or not st["wandb_staging_bytes"]
                                 else " (another file system: not in the total)"),
         format_bytes(st["wandb_staging_bytes"])),
        ("stacked-file rewrite headroom", format_bytes(st["rewrite_headroom_bytes"])),
        ("total on disk", format_bytes(st["total_bytes"])),
        ("host RAM for the snapshot ring (at most)", format_bytes(st["host_buffer_bytes"]),
         st["host_buffer_basis"])])
    out.append("  vocab scaling:  " + "  ".join(f"V={r['vocab_size']:,}: {format_bytes(r['snapshot_bytes'])}" for r in st["scaling"]))
    out.append("")
    w = f.wandb
    out += _table("Weights & Biases", [("metric points", f"{w['metric_points']:,}"),
                                       ("run file", format_bytes(w["run_file_bytes"])),
                                       ("artifacts (checkpoints)", format_bytes(w["artifact_bytes"])),
                                       ("total", format_bytes(w["total_bytes"]))])
    out.append("Budgets")
    out += [f"  {v.line()}" for v in f.verdicts.values()]
    out.append(f"  decision: {f.decision}; save_every_n_steps = {f.save_every_n_steps}")
    out += [f"  note: {n}" for n in f.notes]
    return "\n".join(out)
