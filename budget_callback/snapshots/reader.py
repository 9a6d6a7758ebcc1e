"""Read a snapshot directory at the disk's speed: ``SnapshotReader(dir).trajectory(token_id)``.

The headers of every file are read once (and checked against the file sizes, see
:func:`.directory.scan`) into an index: for every step and name, an open file and the byte
offset of that step's ``(V, D)`` matrix. After that no header is parsed again:

* ``trajectory(token)`` -> ``(S, D)``: rows copied out of the files mapped in memory while they are
  in the page cache (no system call per row), else one ``preadv`` per step into a reused buffer;
* ``rows(tokens)`` -> ``(T, S, D)``: few tokens: per step, one ``preadv`` per group of tokens
  within 4 KiB that scatters their rows into the result; many tokens: whole matrices, 64 MiB of
  steps at a time, gathered by ``index_select``;
* ``load(step)`` -> ``(V, D)``: one read.

Cold data: the first pass reads with ``RWF_NOWAIT`` (cached rows cost one syscall each, the
others fail fast); the missing rows are then requested all at once with
``posix_fadvise(WILLNEED)``, so the disk serves them in parallel, and read. A trajectory that
found every row cached reads the next one from the memory maps; if that meets a page that has to
come from the disk (a chunk of rows takes long), it goes back to the two passes for the rest.
Files are replaced only by rename, so an open file keeps reading the complete file it opened. (A
file truncated in place by another program is noticed by the mapped reads within a second, and
reported; inside that second it would fault.)
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from .directory import SnapshotFile, scan
from .format import ITEMSIZE, NAMES

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_ROW_SECONDS = 0.0002  # a mapped row slower than this came from the disk: back to the two passes
_SIZE_CHECK_SECONDS = 1.0  # how often mapped reads check that no file was cut short in place
_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class SnapshotReader:
    """Snapshots written by :class:`~budget_callback.BudgetCallback`, in either file layout.

    ``steps`` lists the optimizer steps that have a snapshot; ``load(step)`` returns W ``(V, D)`` in
    the stored dtype; ``trajectory(token_id)`` returns that token's row at every step
    ``(len(steps), D)`` and ``rows(token_ids)`` several tokens' ``(T, len(steps), D)``, reading only
    those rows. A stray, foreign or truncated file never hides the valid snapshots: it is left out,
    named in a warning and in ``bad_files``. Close it (or use ``with``) to release its open files.
    """

    def __init__(self, snapshot_dir: str | os.PathLike) -> None:
        if sys.byteorder != "little":  # pragma: no cover
            raise RuntimeError("safetensors data is little-endian; this reader does not byteswap")
        self.directory = Path(snapshot_dir)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"`snapshot_dir` {str(self.directory)!r} is not a directory")
        found = scan(self.directory)
        self.manifest = found.manifest or {}
        self.bad_files = {b.path.name: b.reason for b in found.bad}
        if found.bad:
            warnings.warn(f"SnapshotReader: {len(found.bad)} file(s) in {str(self.directory)!r} are not readable "
                          "snapshots and are left out: " + "; ".join(b.line() for b in found.bad[:5]), stacklevel=2)
        shapes = {(tuple(f.tensors["unembedding"]["shape"][-2:]), f.tensors["unembedding"]["dtype"])
                  for f in found.files}
        if len(shapes) > 1:
            raise ValueError(f"snapshot files in {str(self.directory)!r} hold matrices of different shapes or dtypes "
                             f"{sorted(shapes)}: more than one series")
        (self.shape, code) = next(iter(shapes), ((0, 0), "BF16"))
        self.vocab_size, self.hidden_dim = self.shape
        self.dtype = _TORCH[code]
        self.row_bytes = self.hidden_dim * ITEMSIZE[code]
        self.matrix_bytes = self.vocab_size * self.row_bytes
        self._nowait = bool(_NOWAIT)
        self._lock = threading.Lock()
        self._fds: dict[int, str] = {}  # fd -> file name (for messages)
        self._maps: dict[int, mmap.mmap] = {}  # fd -> the file mapped read-only
        self._warm: dict[str, bool] = {}  # name -> the last trajectory found every row cached
        self._sizes_checked = float("-inf")
        self._where: dict[str, dict[int, tuple[int, int]]] = {}  # name -> step -> (fd, offset of its matrix)
        self._open(found.files)
        self.steps: list[int] = sorted(self._where.get("unembedding", {}))
        self._buffers: dict[str, tuple] = {}

    def _open(self, files: list[SnapshotFile]) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = len(files) + 64
        if soft != resource.RLIM_INFINITY and soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard),
                                                        hard))
        try:
            for f in files:
                fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
                self._fds[fd] = f.path.name
                if f.size:
                    self._maps[fd] = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                    self._maps[fd].madvise(mmap.MADV_RANDOM)  # a fault reads its page, not a window
                for name, info in f.tensors.items():
                    start = f.data_start + int(info["data_offsets"][0])
                    where = self._where.setdefault(name, {})
                    for j, step in enumerate(f.steps):
                        where[step] = (fd, start + (j * self.matrix_bytes if f.stacked else 0))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps = {}
        for fd in self._fds:
            os.close(fd)
        self._fds = {}
        self._where = {}

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"SnapshotReader({str(self.directory)!r}, {len(self)} snapshots)"

    # --- what to read ----------------------------------------------------------------------
    def _index(self, name: str) -> list[tuple[int, int]]:
        if name not in NAMES:
            raise ValueError(f"`name` must be one of {', '.join(NAMES)}, got {name!r}")
        if name == "embedding" and "embedding" not in self._where:
            if not self.manifest.get("tied"):
                raise KeyError("no embedding stored: train with BudgetCallback(include_embedding=True)")
            name = "unembedding"  # tied: E is W, stored once
        where = self._where.get(name, {})
        return [where[s] for s in self.steps]

    def _token(self, token_id) -> int:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
            raise IndexError(f"`token_id` must be an int in [0, {self.vocab_size}), got {token_id!r}")
        return token_id

    def _tensor(self, buf: bytearray, shape: tuple[int, ...]) -> torch.Tensor:
        if len(buf) == 0:
            return torch.empty(shape, dtype=self.dtype)
        return torch.frombuffer(buf, dtype=self.dtype).view(shape)

    def _read(self, items, shift: int, size: int | None = None) -> int:
        """For each ``(fd, base, buffers[, nbytes])``: read at ``base + shift`` into ``buffers``.

        Pass 1 reads with RWF_NOWAIT: cached ranges are copied, the others fail fast. Pass 2 asks the
        kernel for every missing range at once (``posix_fadvise(WILLNEED)``), then reads them.
        Returns how many ranges were not cached.
        """
        misses = []
        if self._nowait:
            try:
                for i, item in enumerate(items):
                    want = size if size is not None else item[3]
                    try:
                        if os.preadv(item[0], item[2], item[1] + shift, _NOWAIT) != want:
                            misses.append(i)
                    except BlockingIOError:
                        misses.append(i)
            except OSError as err:  # RWF_NOWAIT unsupported here: plain reads from now on
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False
                misses = list(range(len(items)))
        else:
            misses = list(range(len(items)))
        if len(misses) > 1:
            for i in misses:
                item = items[i]
                os.posix_fadvise(item[0], item[1] + shift, size if size is not None else item[3],
                                 os.POSIX_FADV_WILLNEED)
        for i in misses:
            fd, base, buffers = items[i][:3]
            want = size if size is not None else items[i][3]
            if os.preadv(fd, buffers, base + shift) != want:
                raise OSError(f"snapshot file {self._fds.get(fd, fd)} is shorter than its header says "
                              "(changed since the reader opened it)")
        return len(misses)

    def _read_mapped(self, items, shift: int, size: int) -> int:
        """Copy rows out of the memory maps while they are cached; the index of the first row not read
        (``len(items)`` when all were), stopping after a row slow enough to have waited for the disk."""
        clock = time.perf_counter
        if clock() - self._sizes_checked > _SIZE_CHECK_SECONDS:  # a file cut short under us: an error, not SIGBUS
            if any(os.fstat(fd).st_size < len(m) for fd, m in self._maps.items()):
                return 0
            self._sizes_checked = clock()
        t0 = clock()
        for i, (fd, base, buffers) in enumerate(items):
            m = self._maps.get(fd)
            o = base + shift
            if m is None or o + size > len(m):
                return i
            buffers[0][:] = m[o:o + size]
            t1 = clock()
            if t1 - t0 > _ROW_SECONDS:
                return i + 1
            t0 = t1
        return len(items)

    # --- the reads -----------------------------------------------------------------------------
    def load(self, step: int, name: str = "unembedding") -> torch.Tensor:
        """W (or E) at optimizer step ``step``, shape ``(V, D)``, in the stored dtype."""
        index = self._index(name)
        try:
            fd, base = index[self.steps.index(step)]
        except ValueError:
            raise KeyError(f"no snapshot at step {step}; steps run from {self.steps[:1]} to {self.steps[-1:]}") from None
        buf = bytearray(self.matrix_bytes)
        self._read([(fd, base, (memoryview(buf),))], 0, self.matrix_bytes)
        return self._tensor(buf, self.shape)

    def trajectory(self, token_id: int, name: str = "unembedding") -> torch.Tensor:
        """Row ``token_id`` at every step, ``(len(steps), D)``; reads only those rows."""
        token, index, rb = self._token(token_id), self._index(name), self.row_bytes
        with self._lock:
            if name not in self._buffers:  # one reused buffer with a ready-made slice per step
                buf = bytearray(len(index) * rb)
                mv = memoryview(buf)
                self._buffers[name] = (buf, [(fd, base, (mv[i * rb:(i + 1) * rb],)) for i, (fd, base) in
                                             enumerate(index)])
            buf, items = self._buffers[name]
            done = self._read_mapped(items, token * rb, rb) if self._warm.get(name) else 0
            if done < len(items):
                self._warm[name] = self._read(items[done:], token * rb, rb) == 0
            out = bytearray(buf)
        return self._tensor(out, (len(index), self.hidden_dim))

    def rows(self, token_ids, name: str = "unembedding", gap_bytes: int = 4096,
             chunk_bytes: int = 64 << 20) -> torch.Tensor:
        """Rows of several tokens at every step, ``(len(token_ids), len(steps), D)``."""
        tokens = [self._token(t) for t in token_ids]
        index, S, D, rb = self._index(name), len(self.steps), self.hidden_dim, self.row_bytes
        uniq = sorted(set(tokens))
        if uniq and S and len(uniq) * 4096 * 2 >= self.matrix_bytes:  # dense: whole matrices, gathered
            res = self._rows_dense(index, uniq, chunk_bytes)
        else:
            res = self._tensor(self._rows_sparse(index, uniq, gap_bytes), (len(uniq), S, D))
        if tokens == uniq:
            return res
        pos = {t: i for i, t in enumerate(uniq)}
        return res[[pos[t] for t in tokens]]

    def _rows_sparse(self, index, uniq: list[int], gap_bytes: int) -> bytearray:
        S, rb, U = len(index), self.row_bytes, len(uniq)
        out = bytearray(U * S * rb)  # (U, S, D)
        if not (U and S):
            return out
        iov_max = max(2, os.sysconf("SC_IOV_MAX"))
        segments: list[list[int]] = []  # runs of positions in uniq read by one preadv
        for p, t in enumerate(uniq):
            if segments and (t - uniq[segments[-1][-1]] - 1) * rb <= gap_bytes and 2 * len(segments[-1]) + 1 <= iov_max:
                segments[-1].append(p)
            else:
                segments.append([p])
        widest = max([(uniq[g[k + 1]] - uniq[g[k]] - 1) * rb for g in segments for k in range(len(g) - 1)] or [0])
        scratch, mv = memoryview(bytearray(max(widest, 1))), memoryview(out)
        items = []
        for seg in segments:
            first = uniq[seg[0]]
            span = (uniq[seg[-1]] - first + 1) * rb
            for s, (fd, base) in enumerate(index):
                buffers = []
                for k, p in enumerate(seg):
                    gap = (uniq[p] - uniq[seg[k - 1]] - 1) * rb if k else 0
                    if gap:
                        buffers.append(scratch[:gap])
                    o = (p * S + s) * rb
                    buffers.append(mv[o:o + rb])
                items.append((fd, base + first * rb, tuple(buffers), span))
        self._read(items, 0)
        return out

    def _rows_dense(self, index, uniq: list[int], chunk_bytes: int) -> torch.Tensor:
        S, (V, D), mb = len(index), self.shape, self.matrix_bytes
        picked = torch.tensor(uniq, dtype=torch.long)
        res = torch.empty((len(uniq), S, D), dtype=self.dtype)
        C = max(1, min(S, chunk_bytes // max(mb, 1)))
        buf = bytearray(C * mb)
        mv, whole = memoryview(buf), self._tensor(buf, (C, V, D))
        for s0 in range(0, S, C):
            n = min(C, S - s0)
            self._read([(fd, base, (mv[j * mb:(j + 1) * mb],), mb) for j, (fd, base) in enumerate(index[s0:s0 + n])], 0)
            res[:, s0:s0 + n] = whole[:n].index_select(1, picked).transpose(0, 1)
        return res
