"""Benchmark 1b, the reader at scale: ``SnapshotReader`` on 5,000 snapshots against the bare system calls and
the code a user would write with safetensors, side by side.

Data: 5,000 snapshots of 10,000 x 64 bf16 (K=1: 5,000 files of 1,280,176 B, 6.4 GB), written by the product's
writer and kept under ``/tmp/bench/snapshot_io/reader/k1_s5000`` between runs (``--fresh-data`` rewrites it;
``--snapshots`` and ``--vocab`` make a smaller series where the disk is short). Every call is warm: every file is
read into the page cache before each part.

Each call is measured three ways in every round, in a fresh random order, on the same arguments drawn for that
round (a token, a set of tokens, a step):

* the product: one ``SnapshotReader`` opened before the rounds (except for the open row itself);
* the limit: the bare loop of system calls that reads exactly those bytes, with every file already open (the
  loop holds 5,000 descriptors of its own, opened outside the timing): one ``os.preadv`` per row (trajectory,
  rows), per matrix (load, and for rows the other bare loop: every whole matrix, no gather), per header (open:
  ``os.scandir``, then open, read the 8-byte length, read the header, close, per file). For ``rows`` the limit of
  a round is the faster of its two bare loops;
* the naive code: ``safetensors.safe_open`` per file, then ``get_slice(...)[token]`` (trajectory),
  ``get_tensor(...)[tokens]`` (rows), ``get_tensor`` (load), ``metadata()`` (open).

Ratios are taken within a round; the table gives their median and min–max over the rounds. Targets (issue 18):
every call within 1.5x of its limit and never slower than the naive code; opening adds under 100 MB of RSS.

    python benchmarks/reader_scale.py                # ~10 min here; writes results/reader_scale.md
    python benchmarks/reader_scale.py --quick        # a smoke run: 500 snapshots, few rounds; prints only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import struct
import sys
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (conditions, log, median, reader_base, table, tmp_dir, verdict, warm_all,  # noqa: E402
                    write_reader_data, write_section)

from budget_callback.snapshots.reader import SnapshotReader  # noqa: E402

warnings.filterwarnings("ignore")

SCRIPT = "python benchmarks/reader_scale.py"
D = 64
PRODUCT, LIMIT, NAIVE = "product", "limit", "naive"
ROWS_K = (10, 40, 100, 156, 400)


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pattern(V: int, step: int) -> torch.Tensor:
    return ((reader_base(V, D) + 31 * step) % 32749).to(torch.int16)


def make_data(d: Path, V: int, S: int, fresh: bool) -> str:
    """S snapshots of V x 64 bf16 written by the product's writer, kept between runs: snapshot_io.py's reader
    data (the same series when V is 10,000)."""
    return write_reader_data(d, V, D, 1, S, fresh)


class Bare:
    """The limits: bare system-call loops over files this object holds open itself (opened outside the timing)."""

    def __init__(self, reader: SnapshotReader) -> None:
        self.paths = list(reader._paths)
        self.fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        index = reader._index("unembedding").items
        self.at = [(self.fds[n], base) for n, base in index]  # per step: (fd, offset of its matrix)
        self.S, self.rb, self.V = len(index), reader.row_bytes, reader.vocab_size
        self.mb = reader.matrix_bytes
        self.directory = reader.directory
        buf = bytearray(self.S * self.rb)
        mv = memoryview(buf)
        self.traj_buf = buf
        self.traj_items = [(fd, base, (mv[i * self.rb:(i + 1) * self.rb],)) for i, (fd, base) in enumerate(self.at)]
        self.whole = memoryview(bytearray(self.mb))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)

    def headers(self):
        """Open: list the directory, then per file open, read the length, read the header, close."""
        out = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".safetensors"):
                fd = os.open(entry.path, os.O_RDONLY)
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                out.append(os.pread(fd, n, 8))
                os.close(fd)
        return out

    def trajectory(self, token: int) -> torch.Tensor:
        shift, preadv = token * self.rb, os.preadv
        for fd, base, dst in self.traj_items:
            preadv(fd, dst, base + shift)
        return torch.frombuffer(bytearray(self.traj_buf), dtype=torch.bfloat16).view(self.S, D)

    def rows(self, tokens: list[int]) -> torch.Tensor:
        """One preadv per row, straight into the (T, S, D) result."""
        S, rb, preadv = self.S, self.rb, os.preadv
        out = torch.empty((len(tokens), S, D), dtype=torch.bfloat16)
        mv = memoryview((__import__("ctypes").c_char * (out.numel() * 2)).from_address(out.data_ptr())).cast("B")
        for s, (fd, base) in enumerate(self.at):
            for j, t in enumerate(tokens):
                o = (j * S + s) * rb
                preadv(fd, [mv[o:o + rb]], base + t * rb)
        return out

    def whole_matrices(self, tokens: list[int]) -> None:
        """One preadv per whole matrix into one reused buffer (no gather: the bytes alone)."""
        preadv, dst = os.preadv, [self.whole]
        for fd, base in self.at:
            preadv(fd, dst, base)

    def load(self, step: int) -> torch.Tensor:
        fd, base = self.at[step - 1]
        out = torch.empty((self.V, D), dtype=torch.bfloat16)
        mv = memoryview((__import__("ctypes").c_char * self.mb).from_address(out.data_ptr())).cast("B")
        os.preadv(fd, [mv], base)
        return out


class Naive:
    """What a user writes with safetensors: open every file, take what is needed."""

    def __init__(self, paths) -> None:
        self.paths = [str(p) for p in paths]

    def open(self):
        steps = []
        for p in sorted(self.paths):
            with safe_open(p, framework="pt") as fh:
                steps.append(int(fh.metadata()["first_step"]))
        return steps

    def trajectory(self, token: int) -> torch.Tensor:
        out = []
        for p in self.paths:
            with safe_open(p, framework="pt") as fh:
                out.append(fh.get_slice("unembedding")[token:token + 1])
        return torch.cat(out)

    def rows(self, tokens: list[int]) -> torch.Tensor:
        picked, out = torch.tensor(tokens), []
        for p in self.paths:
            with safe_open(p, framework="pt") as fh:
                out.append(fh.get_tensor("unembedding")[picked])
        return torch.stack(out, 1)

    def load(self, step: int) -> torch.Tensor:
        with safe_open(self.paths[step - 1], framework="pt") as fh:
            return fh.get_tensor("unembedding")


def rounds_of(methods: dict, args: list, rng: random.Random) -> dict[str, list[float]]:
    """Every method once per round on that round's argument, in a fresh random order each round."""
    times = {k: [] for k in methods}
    for arg in args:
        for name in rng.sample(list(methods), len(methods)):
            gc.collect()
            t0 = time.perf_counter()
            methods[name](arg)
            times[name].append(time.perf_counter() - t0)
    return times


def summary(times: dict[str, list[float]], limits: tuple[str, ...] = (LIMIT,)) -> dict:
    """Per-round ratios: product / limit (the fastest of ``limits`` in that round) and product / naive."""
    n = len(times[PRODUCT])
    limit = [min(times[k][i] for k in limits) for i in range(n)]
    return {"times": times, "limit": limit,
            "vs_limit": [times[PRODUCT][i] / limit[i] for i in range(n)],
            "vs_naive": [times[PRODUCT][i] / times[NAIVE][i] for i in range(n)]}


def run(V: int, S: int, rounds: dict, fresh: bool) -> dict:
    d = tmp_dir("snapshot_io/reader") / (f"k1_s{S}" if V == 10_000 else f"k1_v{V}_s{S}")
    log(f"reader at scale: {S:,} snapshots of {V:,} x {D}: data ...")
    how = make_data(d, V, S, fresh)
    log(f"data {how}")
    rng = random.Random(18)
    files = sorted(d.glob("step_*.safetensors"))
    out = {"V": V, "S": S, "files": len(files), "data": how, "bytes": sum(p.stat().st_size for p in files),
           "before": conditions(), "calls": {}, "rss": {}}

    warm_all(files)
    gc.collect()
    r0 = rss_bytes()
    reader = SnapshotReader(d)
    out["rss"]["open"] = rss_bytes() - r0
    assert reader.steps == list(range(1, S + 1)), reader.steps[:5]
    bare, naive = Bare(reader), Naive(files)
    for tok in (0, V - 1, rng.randrange(V)):  # every method reads the same values
        want = pattern(V, 1)[tok]
        for fn in (reader.trajectory, bare.trajectory, naive.trajectory):
            got = fn(tok)
            assert torch.equal(got.view(torch.int16)[0], want) and got.shape == (S, D), fn
    toks = sorted(rng.sample(range(V), 5))
    for fn in (reader.rows, bare.rows, naive.rows):
        assert torch.equal(fn(toks)[:, 2].view(torch.int16), pattern(V, 3)[toks]), fn
    for fn in (reader.load, bare.load, naive.load):
        assert torch.equal(fn(7).view(torch.int16), pattern(V, 7)), fn

    # first trajectory after opening (the reader opens its files then), against a loop that opens each file too
    reader.close()
    fresh_reader = SnapshotReader(d)
    t0 = time.perf_counter()
    fresh_reader.trajectory(1)
    first = time.perf_counter() - t0
    rb = fresh_reader.row_bytes
    t0 = time.perf_counter()
    dst = [memoryview(bytearray(rb))]
    for p in bare.paths:
        fd = os.open(p, os.O_RDONLY)
        os.preadv(fd, dst, 176 + rb)
        os.close(fd)
    first_bare = time.perf_counter() - t0
    out["first_trajectory"] = (first, first_bare)
    reader = fresh_reader

    log("open ...")
    warm_all(files)

    def open_reader(_):
        SnapshotReader(d).close()
    out["calls"]["open"] = summary(rounds_of({PRODUCT: open_reader, LIMIT: lambda _: bare.headers(),
                                             NAIVE: lambda _: naive.open()}, [None] * rounds["open"], rng))
    log("trajectory ...")
    warm_all(files)
    out["calls"]["trajectory"] = summary(rounds_of({PRODUCT: reader.trajectory, LIMIT: bare.trajectory,
                                                   NAIVE: naive.trajectory},
                                                  [rng.randrange(V) for _ in range(rounds["trajectory"])], rng))
    out["rss"]["after trajectories"] = rss_bytes() - r0
    log("load ...")
    out["calls"]["load"] = summary(rounds_of({PRODUCT: reader.load, LIMIT: bare.load, NAIVE: naive.load},
                                            [rng.randrange(1, S + 1) for _ in range(rounds["load"])], rng))
    for k in ROWS_K:
        if k > V // 4:
            continue
        log(f"rows({k}) ...")
        warm_all(files)
        args = [rng.sample(range(V), k) for _ in range(rounds["rows"])]
        times = rounds_of({PRODUCT: reader.rows, "limit: one preadv per row": lambda t: bare.rows(sorted(t)),
                           "limit: every whole matrix": bare.whole_matrices, NAIVE: naive.rows}, args, rng)
        out["calls"][f"rows({k})"] = summary(times, ("limit: one preadv per row", "limit: every whole matrix"))
        log(f"rows({k}): product {median(times[PRODUCT]) * 1e3:.0f} ms; {conditions()}")
    gc.collect()
    out["rss"]["after every call"] = rss_bytes() - r0
    reader.close()
    bare.close()
    out["after"] = conditions()
    return out


def ms(xs) -> str:
    xs = [x * 1e3 for x in xs]
    fmt = "{:,.1f}" if median(xs) < 100 else "{:,.0f}"
    return f"{fmt.format(median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def ratio(xs) -> str:
    return f"{median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f}, n={len(xs)})"


LIMIT_TEXT = {
    "open": "scandir + per file: open, read length, read header, close",
    "trajectory": "one preadv per step",
    "load": "one preadv of the matrix",
}


def render(res: dict, quick: bool) -> str:
    S, V = res["S"], res["V"]
    md = [f"### Reader at scale: {S:,} snapshots of {V:,} x {D} bf16 in {res['files']:,} files "
          f"({res['bytes'] / 1e9:.1f} GB), warm", ""]
    if quick:
        md += ["**`--quick` smoke run: few rounds, not the figures to quote.**", ""]
    md += [f"Measured by `{SCRIPT}` (issue 18). Each round runs the product, the limit (the bare system calls for "
           "exactly those bytes, on files the loop holds open itself) and the naive safetensors code on the same "
           "arguments, in a fresh random order; ratios are taken within the round (below 1: the product is faster). "
           "For `rows(k)` the limit of a round is the faster of two bare loops: one `preadv` per row, or every whole "
           "matrix read (the bytes alone, no gather). The naive code: `safe_open` per file, then "
           "`get_slice(...)[token]` (trajectory), `get_tensor(...)[tokens]` (rows), `get_tensor` (load), "
           "`metadata()` (open). Every file was read into the page cache before each part.", ""]
    rows = []
    for call, r in res["calls"].items():
        t = r["times"]
        limit_text = LIMIT_TEXT.get(call, "faster of: one preadv per row, every whole matrix")
        ok = median(r["vs_limit"]) <= 1.5 and median(r["vs_naive"]) <= 1.0
        rows.append([f"`{call}`" if call != "open" else "open (`SnapshotReader(dir)`)", ms(t[PRODUCT]),
                     f"{ms(r['limit'])}: {limit_text}", ms(t[NAIVE]), ratio(r["vs_limit"]), ratio(r["vs_naive"]),
                     "<= 1.5x limit, <= 1x naive", verdict(ok)])
    md += [table(["call", "product ms, median (min–max)", "limit ms (what it is)", "naive ms", "product / limit",
                  "product / naive", "target", "result"], rows), ""]
    rss = res["rss"]
    md += [table(["resident memory (VmRSS) of the benchmark process, change since before opening", "MiB", "target",
                  "result"],
                 [["after `SnapshotReader(dir)`", f"{rss['open'] / 2**20:,.1f}", "< 100 MB",
                   verdict(rss["open"] < 100e6)],
                  ["after the trajectory rounds", f"{rss['after trajectories'] / 2**20:,.1f}", "reported", "n/a"],
                  ["after every call above (results freed)", f"{rss['after every call'] / 2**20:,.1f}", "reported",
                   "n/a"]]), ""]
    first, first_bare = res["first_trajectory"]
    md += [f"First `trajectory` of a freshly opened reader (it opens every file then, and keeps them open): "
           f"{first * 1e3:,.0f} ms, against {first_bare * 1e3:,.0f} ms for a bare loop that opens each file, reads "
           "one row and closes it (one call, for information).", ""]
    for call, r in res["calls"].items():
        if call.startswith("rows"):
            t = r["times"]
            md.append(f"- `{call}`: one preadv per row {ms(t['limit: one preadv per row'])} ms, every whole matrix "
                      f"{ms(t['limit: every whole matrix'])} ms.")
    md += ["", f"Data {res['data']}. Conditions: before {res['before']}; after {res['after']}.", ""]
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 500 snapshots, few rounds; prints only")
    p.add_argument("--snapshots", type=int, default=5000, help="snapshots in the series (default 5,000)")
    p.add_argument("--vocab", type=int, default=10_000, help="vocabulary V (default 10,000)")
    p.add_argument("--fresh-data", action="store_true", help="rewrite the data even if it is there")
    args = p.parse_args(argv)
    S = 500 if args.quick else args.snapshots
    rounds = {"open": 3, "trajectory": 5, "load": 5, "rows": 2} if args.quick else \
        {"open": 7, "trajectory": 21, "load": 21, "rows": 5}
    t0 = time.perf_counter()
    res = run(args.vocab, S, rounds, args.fresh_data)
    md = render(res, args.quick) + f"\nWhole run: {(time.perf_counter() - t0) / 60:.1f} min.\n"
    raw = tmp_dir("snapshot_io") / "reader_scale.json"
    raw.write_text(json.dumps(res))
    log(f"per-round data: {raw}")
    if not args.quick and args.snapshots == 5000 and args.vocab == 10_000:
        write_section("reader_scale", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
