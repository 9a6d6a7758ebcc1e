"""Read a W&B offline run file back (tests only).

wandb 0.31 ships no Python reader for ``run-*.wandb``: the Go core writes a
LevelDB-style log (7-byte header, 32 KiB blocks of CRC'd chunks), each payload
one ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_run_file(run_dir: str) -> str:
    if run_dir.endswith(".wandb"):
        return run_dir
    files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {run_dir}, got {files}")
    return files[0]


def read_records(run_dir: str, check_crc: bool = True) -> list[pb.Record]:
    """Parse every Record in wandb/offline-run-*/run-<id>.wandb.

    Tolerates a truncated tail (file still being written): stops at the first
    incomplete chunk instead of raising.
    """
    data = open(find_run_file(run_dir), "rb").read()
    if data[:7] != _HEADER:
        raise ValueError(f"not a wandb transaction log: header {data[:7]!r}")
    out: list[pb.Record] = []
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        crc, n, typ = struct.unpack("<IHB", data[pos:pos + 7])
        if typ == 0 and n == 0:  # zero fill to end of block
            pos += left
            continue
        if pos + 7 + n > len(data):  # truncated tail
            break
        payload = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if check_crc and (zlib.crc32(payload, zlib.crc32(bytes([typ]))) & 0xFFFFFFFF) != crc:
            raise ValueError(f"crc mismatch at offset {pos - 7 - n}")
        if typ == _FULL:
            buf = payload
        elif typ == _FIRST:
            buf = payload
            continue
        elif typ == _MIDDLE:
            buf += payload
            continue
        elif typ == _LAST:
            buf += payload
        else:
            raise ValueError(f"bad chunk type {typ}")
        rec = pb.Record()
        rec.ParseFromString(buf)
        out.append(rec)
    return out


def _key(item) -> str:
    # 0.31 writes history/summary items with `nested_key` (list), not `key`.
    # A nested dict logged as {"a": {"b": 1}} arrives as nested_key=["a","b"].
    return item.key if item.key else ".".join(item.nested_key)


def history_rows(recs: list[pb.Record]) -> list[dict[str, Any]]:
    """One dict per wandb.log() call: {'_step':..,'_runtime':..,'_timestamp':.., key: value}."""
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({_key(it): json.loads(it.value_json) for it in r.history.item})
    return rows


def _set_nested(d: dict, path: list[str], value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value


def config_dict(recs: list[pb.Record]) -> dict[str, Any]:
    """Initial config is in the `run` record (run.config.update, `key`=top-level name, value_json =
    whole nested dict as JSON). Later config.update()/log_hyperparams() calls are `config` records.
    wandb itself adds _wandb.visualize.<chart key> via `nested_key` paths (custom charts)."""
    cfg: dict[str, Any] = {}

    def apply(c):
        for it in c.update:
            _set_nested(cfg, [it.key] if it.key else list(it.nested_key), json.loads(it.value_json))
        for it in c.remove:
            path = [it.key] if it.key else list(it.nested_key)
            d = cfg
            for p in path[:-1]:
                d = d.get(p, {})
            d.pop(path[-1], None)

    for r in recs:
        t = r.WhichOneof("record_type")
        if t == "run":
            apply(r.run.config)
        elif t == "config":
            apply(r.config)
    return cfg


def summary_dict(recs: list[pb.Record]) -> dict[str, Any]:
    """Replay `summary` records (one per log() call + one '_wandb.runtime' record per call).
    Offline mode writes NO files/wandb-summary.json (checked), so replaying records is the only source.
    Keys are flat ('plan/table.path', '_wandb.runtime')."""
    s: dict[str, Any] = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            for it in r.summary.update:
                s[_key(it)] = json.loads(it.value_json)
            for it in r.summary.remove:
                s.pop(_key(it), None)
    return s


def metric_defs(recs: list[pb.Record]) -> list[dict[str, Any]]:
    """define_metric() calls -> `metric` records (MetricRecord)."""
    out = []
    for r in recs:
        if r.WhichOneof("record_type") == "metric":
            m = r.metric
            out.append({"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric,
                        "step_sync": m.options.step_sync, "defined": m.options.defined})
    return out


def media_in_history(rows: list[dict[str, Any]]) -> dict[str, dict]:
    """wandb.Table / wandb.plot.* values are logged as dicts, and wandb-core FLATTENS them into
    history items with nested_key=[<key>, <field>], i.e. history_rows() gives flat keys like
      'plan/table._type' = 'table-file', 'plan/table.path' = 'media/table/plan/table_16_<hash>.table.json',
      '.nrows', '.ncols', '.sha256', '.size', '.log_mode', '.artifact_path', '._latest_artifact_path'.
    wandb.plot.line / line_series(key=K) log the data as table K+'_table' and put the vega spec
    into config['_wandb']['visualize'][K] (a `config` record). The table DATA is NOT in
    run-*.wandb: it is files/media/table/...table.json (+ an `artifact` record of type run_table).
    Returns {key: {field: value, '_step': s, 'trainer/global_step': gs?}} for the last log of each key.
    """
    out: dict[str, dict] = {}
    for row in rows:
        bases = {k[: -len("._type")] for k in row if k.endswith("._type")}
        whole = {k: v for k, v in row.items() if isinstance(v, dict) and "_type" in v}  # wandb < 0.18: not flattened
        for b in bases | set(whole):
            ref = dict(whole[b]) if b in whole else {k[len(b) + 1:]: v for k, v in row.items() if k.startswith(b + ".")}
            ref["_step"] = row.get("_step")
            if "trainer/global_step" in row:
                ref["trainer/global_step"] = row["trainer/global_step"]
            out[b] = ref
    return out


def load_table(run_dir: str, table_ref: dict) -> dict:
    """Read the table json referenced from history ({'columns': [...], 'data': [[...]]})."""
    return json.load(open(os.path.join(run_dir, "files", table_ref["path"])))


def read_complete(run_dir: str, timeout: float = 20.0) -> list[pb.Record]:
    """Records of a finished run: waits (bounded) until the ``exit`` record has been written."""
    deadline = time.monotonic() + timeout
    while True:
        recs = read_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)
