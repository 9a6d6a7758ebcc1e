"""The console output W&B captures into a run's ``run-*.wandb`` file (pure: counts in, bytes out).

``console_output_bytes(...) -> dict`` (ints, itemised, with "total"); :class:`ConsoleSpec` holds
what the callback reads from the run at fit start. Measured on offline runs (77 configurations,
84 runs: BENCHMARKS.md section 2e, ``benchmarks/wandb_console.py``).

How W&B captures the console (wandb 0.31.0):

* ``console="auto"`` (the default) resolves to ``"wrap"``, which W&B maps to ``"wrap_raw"``: the
  ``write()`` method of ``sys.stdout`` / ``sys.stderr`` is patched and EVERY ``write()`` call
  becomes one ``output_raw`` record, written to the run file as-is: not per line, not batched by
  time, carriage-return updates are NOT collapsed (a 200-step run with the default bar wrote
  408 records = 2 x 200 + 8 structural writes; with 0.02 s, 0.1 s and 1.0 s sleeps per step the
  count was still 2 x updates + 8).
* A record costs the text's UTF-8 bytes + ~42.6 B (stdout) / ~40.3 B (stderr: the default
  output_type is not serialised), 0.9 B more for texts of >= 110 B and 2.1 B more for >= 128 B
  (two length varints grow): means over ~27k records (results/constants.md). tqdm's bar cells are U+2588.. block characters, 3 bytes each.
* ``print(s)`` is two writes (``s`` then ``"\\n"``): (len(s) + 42.6) + 43.6 B. A ``logging``
  StreamHandler (Lightning's ``rank_zero_info``) is one write per call: len(msg) + 1 + 40.3 B; a
  multi-line message (BudgetCallback's report) is one record.
* ``console="off"`` / ``WANDB_CONSOLE=off``: no console records at all.
* ``"wrap_emu"`` / ``"redirect"``: ``output`` records through W&B's terminal emulator, which keeps
  finished lines only (the bar's carriage-return updates collapse into its final line). Offline,
  the emulator is flushed once, at ``wandb.finish()``: one record per stream holding all its lines
  (measured: 20 printed lines + the bar's last line = one 772 B record). Online it also flushes
  every 2 s (``redirect._MIN_CALLBACK_INTERVAL``, ``flush_periodically`` only when online; read in
  the code, not measured: no network here), so an online run adds ~ runtime / 2 s records.
  Measured with stdout not a tty, ``redirect`` kept no progress-bar text at all (the bar also
  vanished from the process's own stdout); on a pseudo-terminal it kept the bar's final line.
* Only what is written AFTER ``wandb.init()`` is captured. WandbLogger creates the run lazily in
  ``Trainer.fit`` (setup hook), so Lightning's "GPU available"/"TPU available" lines and the
  litlogger tip (printed by ``Trainer.__init__``) are captured only when ``wandb.init()`` ran
  before the Trainer was built (``init_before_trainer=True``). The model summary, BudgetCallback's
  report and end line, the "`Trainer.fit` stopped" line and warnings raised during fit are captured.

Lightning's TQDMProgressBar (2.6.6) and tqdm (4.70.1):

* The number of writes does NOT depend on wall time: Lightning calls ``bar.refresh()`` and
  ``bar.set_postfix()`` (refresh=True) directly, which bypasses tqdm's ``mininterval`` /
  ``miniters`` throttle. Per update (every ``refresh_rate`` batches and at the last batch of an
  epoch) the train bar writes twice (refresh, then set_postfix). Wall time only changes the text
  (the it/s figure's width, h:mm:ss once an epoch exceeds an hour): modelled via ``step_seconds``.
* Train bar writes: 1 at creation; 2 per epoch start (reset, set_description); 2 per update;
  1 per epoch end; 1 per validation run (postfix refresh); 3 at close ('', final line, '\\n').
* Sanity-check bar (position 0): 6 + S writes (S = sanity batches updated).
  Validation bar during fit (position 1): every display is 3 writes ('\\n', line, ESC[A):
  13 + 3 x (updates) writes per validation run.
* Line text, not a tty (piped / redirected to a file / a batch job): the bar is 10 cells wide
  (``dynamic_ncols`` finds no terminal) and a train line is 27 + digits(n) + digits(total) +
  it/s width (5-7) + 11 ("mm:ss<mm:ss") + 10-cell bar (10 B + 2 B per filled cell) + the postfix
  ", v_num=XXXX" (WandbLogger shows the run id's last 4 characters) + per prog_bar metric
  ", name=value" (value: Lightning pads to >= 5 characters; 5.28 measured mean).
* Line text on a terminal: ``dynamic_ncols`` fills the terminal: every bar write is ``columns``
  characters and the bar's filled cells cost 2 B more each: a 200-column terminal made a
  200-step run's console 2.55x larger than a pipe, an 80-column one 0.87x.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# ---- fitted / measured constants (wandb 0.31.0, lightning 2.6.6, tqdm 4.70.1; BENCHMARKS.md 2e) ----
# per-record overhead beyond the text's UTF-8 bytes: means over ~27k output_raw records of offline runs
STDOUT_RECORD_OVERHEAD = 42.6  # texts < 110 B
STDERR_RECORD_OVERHEAD = 40.3  # stderr: the default output_type (0) is not serialised
MID_TEXT, MID_TEXT_EXTRA = 110, 0.9  # >= 110 B: the OutputRawRecord's length varint takes 2 bytes
LONG_TEXT, LONG_TEXT_EXTRA = 128, 1.2  # >= 128 B: the line's own length varint too (44.7 B in all)
# characters of a train-bar line besides digits, rate, time, bar, postfix (counted, not fitted):
# "\r" + "Epoch 0: " + "100%|" + "| " + "/" + " [" + ", " + "it/s" + "]" = 27
TRAIN_LINE_FIXED_CHARS = 27.0
TRAIN_LINE_PAD_CHARS = 0.15  # tqdm pads a line shorter than the previous one with spaces: mean over 20k lines
VAL_LINE_FIXED_CHARS = 54.0  # "\rValidation DataLoader 0: " + "100%|" + "| " + "/" + " [" + "00:00<00:00" + ", " + "it/s]"
SANITY_LINE_FIXED_CHARS = 59.0  # the same with "Sanity Checking DataLoader 0: "
TIME_CHARS = 11  # "mm:ss<mm:ss"; each of elapsed/remaining takes 2 more as "h:mm:ss" past an hour
METRIC_VALUE_CHARS = 5.28  # Lightning's Tqdm.format_num pads to 5 ("2.340"); 5.28 = measured mean (23.7k values)
VERSION_CHARS = 4  # WandbLogger: v_num is the last 4 characters of the run id
DESC0_LINE_CHARS = 46  # "\rEpoch 0:   0%|          | 0/" + N + " [00:00<?, ?it/s]"
NOTOTAL_LINE_CHARS = 44  # "\rTraining: |          | 0/? [00:00<?, ?it/s]" (bar creation, first reset)
SANITY_FIXED_LINES = (51, 51, 68, 77)  # creation, reset, description, clear (spaces); then '\r', ''
VAL_FIXED_LINES = (46, 46, 63, 72)  # creation, reset, description, clear line (each inside '\n' .. ESC[A)
STOP_LINE_CHARS = 45  # "`Trainer.fit` stopped: `max_steps=` reached.\n" + digits of max_steps
INIT_LINES = ((34, 1), (41, 1), (233, 1))  # "GPU available..", "TPU available..", litlogger tip (CPU run)
# printed by CUDAAccelerator.setup, after the W&B run started: from Lightning's code, NOT measured (no GPU here)
LOCAL_RANK_LINE_CHARS = len("LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]\n")
# measured sizes of fixed texts (pass the real ones when known: the callback can render them at fit start)
MODEL_SUMMARY_CHARS = 400  # Lightning's summary of a 1-Linear model (len(str(ModelSummary(model))) + 1)
REPORT_CHARS = 2_764  # BudgetCallback's fit-start report (ShapeLM; 2,762 for the README example's model)
END_LINE_CHARS = 221  # BudgetCallback's end-of-fit summary line (221-229 measured)
DEFAULT_STEP_SECONDS = 0.5


def _overhead(chars: float, stderr: bool = False) -> float:
    base = STDERR_RECORD_OVERHEAD if stderr else STDOUT_RECORD_OVERHEAD
    return base + (MID_TEXT_EXTRA if chars >= MID_TEXT else 0.0) + (LONG_TEXT_EXTRA if chars >= LONG_TEXT else 0.0)


def _rec(chars: float, stderr: bool = False) -> float:
    """Bytes of one output_raw record holding `chars` UTF-8 bytes of text."""
    return chars + _overhead(chars, stderr)


def _digits(x: int) -> int:
    return len(str(max(0, int(x))))


def _positions(total: int, every: int) -> list[int]:
    """The n at which the bar updates in an epoch of `total` batches (n % every == 0, and total);
    an even sample of at most ~2,000 of them for long epochs."""
    count = total // every
    if count <= 2000:
        ns = list(range(every, count * every + 1, every))
    else:  # an even sample, without listing every position of a huge epoch
        ns = [every * (1 + i * (count - 1) // 1999) for i in range(2000)]
    if not ns or ns[-1] != total:
        ns.append(total)
    return ns


def _mean_digits(total: int, every: int = 1) -> float:
    """Mean number of digits of n over the updates of an epoch."""
    ns = _positions(total, every)
    return sum(_digits(n) for n in ns) / len(ns)


def _rate_chars(step_seconds: float) -> int:
    rate = 1.0 / step_seconds if step_seconds > 0 else 1e3
    return max(5, len(f"{rate:.2f}"))  # tqdm '{rate:5.2f}'


def _time_chars(batches: int, step_seconds: float) -> float:
    """Mean width of 'elapsed<remaining' over an epoch (each side 'mm:ss', or 'h:mm:ss' past 1 h)."""
    epoch_s = batches * step_seconds
    if epoch_s <= 3600:
        return TIME_CHARS
    over = 1 - 3600 / epoch_s  # share of the epoch with elapsed >= 1 h (and, symmetric, remaining >= 1 h)
    return TIME_CHARS + 2 * 2 * over


def _bar_cells(nonbar_chars: float, columns: int | None) -> int:
    """tqdm's bar width: 10 cells when not a tty (no ncols); on a tty dynamic_ncols gives
    ncols = columns - 1 and the bar takes what the text leaves (>= 1 cell)."""
    if columns is None:
        return 10
    return max(1, int(round(columns - nonbar_chars)))  # nonbar_chars counts the leading '\r'


def _filled_cells(cells: int, total: int, every: int) -> float:
    """Mean filled cells (full blocks + the partial block) over the updates n = every, 2*every, ...
    (and total) of an epoch: tqdm draws int(f * cells) full cells and a partial one when
    int(f * cells * 8) % 8 != 0 (f = n / total)."""
    ns = _positions(total, every)
    acc = 0
    for n in ns:
        x = n * cells * 8 // total
        acc += min(cells, x // 8 + (1 if x % 8 else 0))
    return acc / len(ns)


def _line_bytes(nonbar_chars: float, columns: int | None, filled: float) -> float:
    """UTF-8 bytes of one bar line with `filled` filled cells (3 B each; blank cells 1 B). On a tty
    the line is `columns` characters; a text longer than that is cut to the width."""
    cells = _bar_cells(nonbar_chars, columns)
    chars = nonbar_chars + cells
    if columns is not None and chars > columns:
        chars = columns
    return chars + 2 * min(filled, cells)


def console_output_bytes(
    *,
    steps: int,
    batches_per_epoch: int | None = None,
    progress_bar: bool = True,
    refresh_rate: int = 1,
    leave: bool = False,
    prog_bar_metrics: int | list[str] = 0,
    metric_name_chars: int = 10,
    version_chars: int | None = VERSION_CHARS,
    val_batches: int = 0,
    val_runs: int | None = None,
    sanity_batches: int = 2,
    console: str = "auto",
    terminal_columns: int | None = None,
    step_seconds: float = DEFAULT_STEP_SECONDS,
    model_summary_chars: int = 0,
    report_chars: int = 0,
    end_line_chars: int = 0,
    stopped_by_max_steps: bool = True,
    init_before_trainer: bool = False,
    cuda: bool = False,
    print_lines: int = 0,
    print_chars: int = 0,
    log_lines: int = 0,
    log_chars: int = 0,
    warning_chars: list[int] | tuple[int, ...] = (),
) -> dict[str, int]:
    """Bytes of the console records (``output_raw``, or ``output`` for the emulated modes) that W&B
    writes into the run file for one ``Trainer.fit`` with Lightning's TQDMProgressBar.

    steps: optimizer steps of the run (max_steps; one batch per step).
    batches_per_epoch: train batches per epoch (None: one epoch of ``steps``).
    progress_bar: False for ``enable_progress_bar=False`` (or a disabled bar).
    refresh_rate: TQDMProgressBar(refresh_rate=...) (1 is the default; TQDM_MINITERS raises it).
    leave: TQDMProgressBar(leave=True): a new bar per epoch (4 more writes per epoch).
    prog_bar_metrics: the names logged with ``self.log(..., prog_bar=True)``, or their number
        (then each name is ``metric_name_chars`` long).
    version_chars: width of the logger's ``v_num`` in the bar (4 for WandbLogger; None: none).
    val_batches, val_runs: validation batches per run and the number of validation runs during fit
        (None: one per completed epoch); sanity_batches: Trainer(num_sanity_val_steps=...) (default 2).
    console: the W&B console setting ("auto", "wrap", "wrap_raw", "off", "wrap_emu", "redirect").
    terminal_columns: None when stdout is not a terminal (pipe, file, batch job); else its width.
    step_seconds: assumed wall time per step; it only changes the text width, not the record count.
    model_summary_chars: len(str(ModelSummary(model))) + 1 when enable_model_summary (0: off).
    report_chars / end_line_chars: the BudgetCallback's fit-start report and end line (0: verbose off).
    init_before_trainer: wandb.init() ran before Trainer(...) (its device lines are then captured).
    cuda: a CUDA run: Lightning's "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [...]" line (code, not measured).
    print_lines x print_chars: user print() lines; log_lines x log_chars: user logging lines (stderr).
    warning_chars: the length of each warning text raised during fit (Python prints each once).
    """
    if steps < 0 or refresh_rate < 0:
        raise ValueError("steps and refresh_rate must be non-negative")
    console = {"auto": "wrap", "wrap_raw": "wrap"}.get(console, console)
    if console not in ("wrap", "off", "wrap_emu", "redirect"):
        raise ValueError(f"unknown console setting {console!r}")
    zero = {"progress_bar": 0, "validation_bars": 0, "model_summary": 0, "callback_report": 0,
            "lightning_lines": 0, "user_prints": 0, "warnings": 0, "emulator_records": 0, "records": 0, "total": 0}
    if console == "off" or steps == 0:
        return zero

    bpe = batches_per_epoch or steps
    epochs = -(-steps // bpe)
    last = steps - (epochs - 1) * bpe  # steps in the last epoch
    if isinstance(prog_bar_metrics, int):
        names = [metric_name_chars] * prog_bar_metrics
    else:
        names = [len(n) for n in prog_bar_metrics]
    postfix = (0 if version_chars is None else len(", v_num=") + version_chars) + sum(
        len(", =") + n + METRIC_VALUE_CHARS for n in names)
    rate = _rate_chars(step_seconds)
    nonbar = (TRAIN_LINE_FIXED_CHARS + TRAIN_LINE_PAD_CHARS + _mean_digits(bpe, max(1, refresh_rate))
              + _digits(bpe) + _time_chars(bpe, step_seconds) + rate + postfix)
    cols = terminal_columns
    cells = _bar_cells(nonbar, cols)
    train_line = _line_bytes(nonbar, cols, _filled_cells(cells, bpe, max(1, refresh_rate)))  # an update
    full_line = _line_bytes(nonbar, cols, cells)  # 100%: epoch end, validation end, close
    # later epochs' reset / set_description: 0%, "?it/s", "00:00<?" (4 chars shorter than mm:ss<mm:ss)
    start_line = _line_bytes(nonbar - rate + 1 - 4, cols, 0)

    def notot(chars: float) -> float:  # a line without a known total: fills the terminal too
        return chars if cols is None else max(chars, cols)

    if val_runs is None:
        val_runs = (steps // bpe) if val_batches else 0
    sanity = min(sanity_batches, val_batches) if val_batches else 0

    # every write() during the run as (part, text bytes, to stderr, times); raw capture makes each
    # one record, the emulator keeps only finished lines (see the module docstring)
    writes: list[tuple[str, float, bool, float]] = []
    final_lines: list[tuple[str, float, bool]] = []  # what the emulator keeps of the bars
    if progress_bar and refresh_rate > 0:
        r = refresh_rate
        updates = (epochs - 1) * -(-bpe // r) + last // r + (1 if (last == bpe and last % r) else 0)
        ends = epochs + val_runs + 1  # epoch ends, validation ends, close: the bar at 100%
        first_desc = notot(DESC0_LINE_CHARS + _digits(bpe))  # "Epoch 0:   0%|          | 0/N [00:00<?, ?it/s]"
        writes += [("progress_bar", train_line, False, 2 * updates), ("progress_bar", full_line, False, ends),
                   ("progress_bar", start_line, False, 2 * (epochs - 1)),
                   ("progress_bar", notot(NOTOTAL_LINE_CHARS), False, 2), ("progress_bar", first_desc, False, 1),
                   ("progress_bar", 0, False, 1), ("progress_bar", 1, False, 1)]  # close: '', line, '\n'
        if leave:  # a new bar per epoch: its creation, and its close ('', line, '\n') at the epoch end
            writes += [("progress_bar", notot(NOTOTAL_LINE_CHARS), False, epochs), ("progress_bar", 0, False, epochs),
                       ("progress_bar", full_line, False, epochs), ("progress_bar", 1, False, epochs)]
        if not (console == "redirect" and cols is None):  # measured: redirect + no tty lost the bar's stdout
            final_lines.append(("progress_bar", full_line - 1 + 1, False))  # without '\r', with '\n'
        if val_batches and sanity:
            # sanity bar at position 0: creation, reset, description, S updates, close ('' + clear + '\r')
            s_updates = sanity // r + (1 if sanity % r else 0)
            v_nonbar = SANITY_LINE_FIXED_CHARS + _digits(sanity) * 2 + 6
            v_line = _line_bytes(v_nonbar, cols, _filled_cells(_bar_cells(v_nonbar, cols), sanity, r))
            fixed = SANITY_FIXED_LINES if cols is None else [cols] * 4
            writes += [("validation_bars", c, False, 1) for c in fixed]
            writes += [("validation_bars", 1, False, 1), ("validation_bars", 0, False, 1),
                       ("validation_bars", v_line, False, s_updates)]
        if val_batches and val_runs:
            # validation bar at position 1: every display is '\n' + line + ESC[A
            v_updates = val_batches // r + (1 if val_batches % r else 0)
            v_nonbar = VAL_LINE_FIXED_CHARS + _mean_digits(val_batches, r) + _digits(val_batches) + 6
            v_line = _line_bytes(v_nonbar, cols, _filled_cells(_bar_cells(v_nonbar, cols), val_batches, r))
            fixed = VAL_FIXED_LINES if cols is None else [cols] * 4  # creation, reset, description, clear
            writes += [("validation_bars", c, False, val_runs) for c in fixed]
            writes += [("validation_bars", 0, False, val_runs), ("validation_bars", v_line, False, val_runs * v_updates),
                       ("validation_bars", 1, False, val_runs * (4 + v_updates)),
                       ("validation_bars", 3, False, val_runs * (4 + v_updates))]
    if model_summary_chars:
        writes.append(("model_summary", model_summary_chars, True, 1))
    for chars in (report_chars, end_line_chars):
        if chars:
            writes.append(("callback_report", chars + 1, True, 1))
    if stopped_by_max_steps:
        writes.append(("lightning_lines", STOP_LINE_CHARS + _digits(steps), True, 1))
    if init_before_trainer:
        writes += [("lightning_lines", c, True, k) for c, k in INIT_LINES]
    if cuda:
        writes.append(("lightning_lines", LOCAL_RANK_LINE_CHARS, True, 1))
    writes += [("user_prints", print_chars, False, print_lines), ("user_prints", 1, False, print_lines),
               ("user_prints", log_chars + 1, True, log_lines)]
    writes += [("warnings", c, True, 1) for c in warning_chars]

    parts = {k: 0.0 for k in zero}
    if console == "wrap":
        for part, chars, err, times in writes:
            parts[part] += times * _rec(chars, err)
            parts["records"] += times
    else:  # wrap_emu / redirect, offline: one record per stream at wandb.finish() holding the finished lines
        kept = [w for w in writes if w[0] not in ("progress_bar", "validation_bars", "user_prints")]
        kept += [(p, c, e, 1) for p, c, e in final_lines]
        kept += [("user_prints", print_chars + 1, False, print_lines), ("user_prints", log_chars + 1, True, log_lines)]
        streams = {}
        for part, chars, err, times in kept:
            if times:
                parts[part] += times * chars
                streams[err] = streams.get(err, 0) + times * chars
        for err, chars in streams.items():
            parts["emulator_records"] += _overhead(chars, err)
            parts["records"] += 1
    out = {k: int(round(v)) for k, v in parts.items() if k != "total"}
    out["total"] = sum(v for k, v in out.items() if k != "records")
    return out


@dataclass(frozen=True)
class ConsoleSpec:
    """What a run prints, as the callback reads it at fit start (or ``plan``'s flags)."""

    progress_bar: bool = True  # Lightning's TQDMProgressBar (False: disabled)
    refresh_rate: int = 1
    batches_per_epoch: int | None = None  # None: one epoch
    prog_bar_metrics: int = 1  # self.log(..., prog_bar=True) values (names unknown before a step: 10 chars)
    val_batches: int = 0
    val_runs: int | None = None
    sanity_batches: int = 2
    console: str = "auto"  # the W&B run's settings.console
    terminal_columns: int | None = None  # None: stdout is not a terminal
    model_summary_chars: int = 0
    report_chars: int = 0  # BudgetCallback's fit-start report (0: verbose off)
    end_line_chars: int = 0
    cuda: bool = False

    def output_bytes(self, steps: int) -> dict[str, int]:
        fields = asdict(self)
        fields["prog_bar_metrics"] = fields.pop("prog_bar_metrics")
        return console_output_bytes(steps=steps, **fields)

    def to_dict(self) -> dict:
        return asdict(self)
