"""Read a snapshot directory at the disk's speed: ``SnapshotReader(dir).trajectory(token_id)``.

The headers of every file are read once (and checked against the file sizes, see
:func:`.directory.scan`) into an index: for every step and name, a file and the byte offset of
that step's ``(V, D)`` matrix. After that no header is parsed again:

* ``trajectory(token)`` -> ``(S, D)``: rows copied out of the files mapped in memory while they are
  in the page cache, by ``process_vm_readv`` (one system call for up to 128 rows, not one per row),
  else one ``preadv`` per step into a reused buffer. A file wholly cached when the reader opens it has
  its pages mapped at once (``MADV_POPULATE_READ``, no I/O, about 0.16 ms per 1.28 MB file);
* ``rows(tokens)`` -> ``(T, S, D)``: few tokens: per step, one ``preadv`` per group of tokens
  within 4 KiB that scatters their rows into the result; many tokens: whole matrices, 64 MiB of
  steps at a time, gathered by ``index_select``;
* ``load(step)`` -> ``(V, D)``: one read.

Cold data: the first pass reads with ``RWF_NOWAIT`` (cached rows cost one syscall each, the
others fail fast); the missing rows are requested with ``posix_fadvise(WILLNEED)`` as they are
found, so the disk serves them in parallel, and read in the second pass. A trajectory that found
every row cached reads the next one from the memory maps; if that meets a page that has to come
from the disk (a chunk of rows takes long), it goes back to the two passes for the rest. Files are
replaced only by rename, so an open or mapped file keeps reading the complete file it opened.

A file truncated in place by another program while it is mapped is never a crash: the mapped rows
are copied by the kernel (``process_vm_readv``), which answers a page past the file's new end with
a short count where a copy made by the process itself would die of SIGBUS; the row is then read with
``preadv``, which names the file. Mapped reads also check the files' sizes at most once a second, so
a file cut short within its last page (no page lost, the rest reads as zeros) is an error by then.

Portable: where a call is missing (macOS, Windows; see :mod:`.osio`) the reader reads the same rows
with ``pread`` (or ``lseek`` + ``read``) in one pass, maps nothing, and takes its bounds' defaults.

Bounded resources, so a series of any length opens under any ``ulimit -n``: at most
``min(128, soft RLIMIT_NOFILE // 4)`` files are open at once (the first ones opened, and one slot the
others take turns in: a longer series opens each of those again, ~5 us, once per read pass) and at
most ``min(16,384, vm.max_map_count // 4)`` files are mapped (the first ones; later files are read
with ``preadv``). The mappings are made with libc's ``mmap`` and outlive the file descriptor
(``mmap.mmap`` keeps a duplicate descriptor per mapping before Python 3.13), so a warm trajectory of
a long series needs no open file. A file opened again must still be the file first opened (same
inode, size and mtime); one replaced or rewritten since is an error naming it. The process's limits
are never changed.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import operator
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from . import osio
from .directory import SnapshotFile, scan
from .format import ITEMSIZE, NAMES

_CHUNK_ROWS = 128  # mapped rows copied per process_vm_readv
_CHUNK_SECONDS = 0.0005  # a chunk slower than this met a page that came from the disk: back to the two passes
_SIZE_CHECK_SECONDS = 1.0  # how often mapped reads check that no file was cut short in place
_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_MAX_OPEN_FILES = 128  # files open at once, at most (and a quarter of the soft RLIMIT_NOFILE): fds stay low
_MAX_MAPS = 16_384  # files mapped at once, at most (and a quarter of vm.max_map_count)
_DEFAULT_MAX_MAP_COUNT = 65_530  # Linux's vm.max_map_count where /proc does not say


def open_files_bound() -> int:
    """How many snapshot files a reader keeps open: well under the soft RLIMIT_NOFILE, never changing it."""
    resource = osio.module("resource")
    if resource is None:  # Windows: the C runtime's limit is far above the bound
        return _MAX_OPEN_FILES
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_OPEN_FILES
    return max(1, min(_MAX_OPEN_FILES, soft // 4))


def maps_bound() -> int:
    """How many snapshot files a reader keeps mapped: well under ``vm.max_map_count`` (mappings per process)."""
    try:
        count = int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        count = _DEFAULT_MAX_MAP_COUNT
    return max(1, min(_MAX_MAPS, count // 4))


class _MappingCalls(NamedTuple):
    mmap: object
    munmap: object
    copy: object  # process_vm_readv
    madvise: object | None
    mincore: object | None


def _mapping_calls() -> _MappingCalls | None:
    """libc's ``mmap``, ``munmap`` and ``process_vm_readv`` (``madvise``, ``mincore`` where they exist); None
    where any of the three is missing (macOS, Windows) or iovecs are not two 64-bit words: rows are read with
    ``preadv`` then."""
    vp, size_t = ctypes.c_void_p, ctypes.c_size_t
    do_mmap = osio.libc_function("mmap", vp, (vp, size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long))
    do_munmap = osio.libc_function("munmap", ctypes.c_int, (vp, size_t))
    copy = osio.libc_function("process_vm_readv", ctypes.c_ssize_t,
                              (ctypes.c_int, vp, ctypes.c_ulong, vp, ctypes.c_ulong, ctypes.c_ulong))
    if None in (do_mmap, do_munmap, copy) or ctypes.sizeof(vp) != 8 or not hasattr(mmap, "MAP_SHARED"):
        return None
    return _MappingCalls(do_mmap, do_munmap, copy, osio.libc_function("madvise", ctypes.c_int, (vp, size_t, ctypes.c_int)),
                         osio.libc_function("mincore", ctypes.c_int, (vp, size_t, ctypes.c_char_p)))


_MAP_FAILED = ctypes.c_void_p(-1).value


class _Mapping:
    """A whole file mapped read-only, holding no file descriptor. Its bytes are read only by the kernel
    (``process_vm_readv``), never touched by this process, so a file cut short under it cannot SIGBUS."""

    def __init__(self, fd: int, size: int, calls: _MappingCalls) -> None:
        self.calls = calls
        addr = calls.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            raise osio.libc_error("mmap")
        self.addr, self.size = addr, size
        if calls.madvise is not None and hasattr(mmap, "MADV_RANDOM"):
            calls.madvise(addr, size, mmap.MADV_RANDOM)  # a fault reads its page, not a window
        self._populate_if_cached()

    def _populate_if_cached(self) -> None:
        """Map every page now if the whole file is in the page cache (no I/O then), so that a row read later
        is a copy, not a fault on the first touch of its page. Where the kernel refuses (before Linux 5.14),
        pages are mapped as they are first read."""
        populate = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; refused (EINVAL) before
        if self.calls.mincore is None or self.calls.madvise is None:
            return
        page = mmap.PAGESIZE
        vec = ctypes.create_string_buffer((self.size + page - 1) // page)
        if self.calls.mincore(self.addr, self.size, vec) == 0 and b"\x00" not in vec.raw:
            self.calls.madvise(self.addr, self.size, populate)

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        if self.addr is not None:
            self.calls.munmap(self.addr, self.size)
            self.addr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _described(value) -> str:
    """``value`` for a message: its type, and its shape and dtype when it has them."""
    shape = getattr(value, "shape", None)
    if shape is not None and getattr(value, "dtype", None) is not None:
        return f"a {len(shape)}-D {type(value).__name__} of shape {tuple(shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_bool(value) -> bool:
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def _integer_dtype(dtype) -> bool:
    """A torch or numpy integer dtype."""
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return getattr(dtype, "kind", None) in ("i", "u")


class SnapshotReader:
    """Snapshots written by :class:`~budget_callback.BudgetCallback`, in either file layout.

    ``steps`` lists the optimizer steps that have a snapshot; ``load(step)`` returns W ``(V, D)`` in
    the stored dtype; ``trajectory(token_id)`` returns that token's row at every step
    ``(len(steps), D)`` and ``rows(token_ids)`` several tokens' ``(T, len(steps), D)``, reading only
    those rows. A stray, foreign or truncated file never hides the valid snapshots: it is left out,
    named in a warning and in ``bad_files``. Token ids may be ints, numpy integers or integer tensors.
    It keeps a bounded number of files open and mapped (see the module's notes); threads sharing it take
    turns. Close it (or use ``with``) to release its open files.
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
        self._nowait = osio.has_nowait()
        self._mapping = _mapping_calls()  # None: nothing is mapped, rows are read with preadv
        self._lock = threading.Lock()  # held by every read: an evicted fd is never one another read uses
        self._max_fds, self._max_maps = open_files_bound(), maps_bound()
        self._paths: list[Path] = []  # file number -> path
        self._idents: list[tuple | None] = []  # file number -> (dev, inode, size, mtime) when first opened
        self._fds: dict[int, int] = {}  # file number -> fd: the first files opened, and the spare slot
        self._spare: int | None = None  # the file in the spare slot (closed when another needs it)
        self._maps: dict[int, _Mapping] = {}  # file number -> the file mapped read-only
        self._closed = False
        self._warm: dict[str, bool] = {}  # name -> the last trajectory found every row cached
        self._where: dict[str, dict[int, tuple[int, int]]] = {}  # name -> step -> (file number, matrix offset)
        self._open(found.files)
        self.steps: list[int] = sorted(self._where.get("unembedding", {}))
        self._buffers: dict[str, tuple] = {}
        self._iovecs: dict[str, tuple] = {}  # name -> (the result's row addresses, the mapped rows' addresses)
        self._sizes_checked = float("-inf")

    def _open(self, files: list[SnapshotFile]) -> None:
        """Index every file; open (and map) each once to note which file it is; keep the bounded few open."""
        try:
            for f in files:
                number = len(self._paths)
                self._paths.append(f.path)
                self._idents.append(None)
                self._fd(number)
                for name, info in f.tensors.items():
                    start = f.data_start + int(info["data_offsets"][0])
                    where = self._where.setdefault(name, {})
                    for j, step in enumerate(f.steps):
                        where[step] = (number, start + (j * self.matrix_bytes if f.stacked else 0))
        except BaseException:
            self.close()
            raise

    def _fd(self, number: int) -> int:
        """File ``number``'s descriptor, opened (and mapped) if it is not open.

        The first ``max_fds - 1`` files opened stay open; the others take turns in one spare slot. Every
        read visits the files in step order, so this keeps that many hits per pass where a least recently
        used cache of fewer files than the series would evict each file just before it is needed again."""
        fd = self._fds.get(number)
        if fd is not None:
            return fd
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        fd = os.open(self._paths[number], osio.open_flags(os.O_RDONLY))
        try:
            size = self._same_file(number, os.fstat(fd))
            if size and number not in self._maps and len(self._maps) < self._max_maps:
                self._map(number, fd, size)
        except BaseException:
            os.close(fd)
            raise
        if len(self._fds) >= self._max_fds and self._spare is not None:
            os.close(self._fds.pop(self._spare))
        self._fds[number] = fd
        if len(self._fds) >= self._max_fds:
            self._spare = number
        return fd

    def _same_file(self, number: int, st: os.stat_result) -> int:
        """Note which file ``number`` is at its first opening; later, refuse any other. Returns its size."""
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._idents[number] is None:
            self._idents[number] = ident
        elif ident != self._idents[number]:
            raise OSError(f"snapshot file {self._paths[number].name} was replaced or rewritten since the reader "
                          "opened it; open a new SnapshotReader")
        return st.st_size

    def _map(self, number: int, fd: int, size: int) -> None:
        """Map the file read-only; the mapping outlives ``fd`` and stays until ``close()``. The first
        ``max_maps`` files are mapped (the same reasoning as for ``_fd``); the others are read with preadv."""
        if self._mapping is None:  # reads go through preadv
            return
        try:
            self._maps[number] = _Mapping(fd, size, self._mapping)
        except OSError:  # out of mappings (ENOMEM: vm.max_map_count) or address space: preadv for the rest
            self._max_maps = len(self._maps)

    def close(self) -> None:
        self._closed = True
        for m in self._maps.values():
            m.close()
        self._maps = {}
        for fd in self._fds.values():
            os.close(fd)
        self._fds, self._spare = {}, None
        self._where = {}
        self._buffers, self._iovecs = {}, {}

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

    def _no_snapshots(self) -> str:
        bad = f"; {len(self.bad_files)} file(s) there are not readable snapshots" if self.bad_files else ""
        return (f"{str(self.directory)!r} holds no snapshots yet (no readable step_*.safetensors files{bad}): "
                "nothing to read; check snapshot_dir, or read again once training has written a snapshot")

    def _token(self, token_id, argument: str = "token_id") -> int:
        """One token id as an int: anything ``operator.index`` takes (numpy integers, 0-d integer tensors)."""
        if _is_bool(token_id):
            raise TypeError(f"`{argument}` must be an integer token id, not a bool, got {_described(token_id)}")
        try:
            if getattr(token_id, "ndim", 0) != 0:
                raise TypeError
            token = operator.index(token_id)
        except TypeError:
            raise TypeError(f"`{argument}` must be one integer token id (an int, a numpy integer or a 0-d integer "
                            f"tensor), got {_described(token_id)}") from None
        if not self.steps:
            raise IndexError(self._no_snapshots())
        if not 0 <= token < self.vocab_size:
            raise IndexError(f"`{argument}` must be an int in [0, {self.vocab_size}), got {token!r}")
        return token

    def _tokens(self, token_ids) -> list[int]:
        """Several token ids as ints: a 1-D integer tensor or array, or a sequence of what ``_token`` takes."""
        if getattr(token_ids, "ndim", None) is not None:  # a tensor or an array
            if token_ids.ndim != 1 or _is_bool(token_ids) or not _integer_dtype(token_ids.dtype):
                raise TypeError(f"`token_ids` must be a 1-D integer tensor or array or a sequence of ints, got "
                                f"{_described(token_ids)}")
            token_ids = token_ids.tolist()
        elif isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
            raise TypeError(f"`token_ids` must be a 1-D integer tensor or array or a sequence of ints, got "
                            f"{_described(token_ids)}")
        return [self._token(t, f"token_ids[{i}]") for i, t in enumerate(token_ids)]

    def _tensor(self, buf: bytearray, shape: tuple[int, ...]) -> torch.Tensor:
        if len(buf) == 0:
            return torch.empty(shape, dtype=self.dtype)
        return torch.frombuffer(buf, dtype=self.dtype).view(shape)

    def _read(self, items, shift: int, size: int | None = None) -> int:
        """For each ``(file number, base, buffers[, nbytes])``: read at ``base + shift`` into ``buffers``.

        Pass 1 reads with RWF_NOWAIT: cached ranges are copied, the others fail fast and, from the second
        on, are asked of the kernel at once (``posix_fadvise(WILLNEED)``). Pass 2 reads them. (Two passes,
        not three: a file that is no longer open is opened again once per pass.) Returns how many ranges
        were not cached.
        """
        misses = self._read_cached(items, shift, size) if self._nowait else None
        if misses is None:  # no RWF_NOWAIT: every range is a miss
            misses = list(range(len(items)))
            for i in misses if len(misses) > 1 else ():
                self._advise(items[i], shift, size)
        for i in misses:
            number, base, buffers = items[i][:3]
            want = size if size is not None else items[i][3]
            if osio.read_into(self._fd(number), buffers, base + shift) != want:
                raise OSError(f"snapshot file {self._paths[number].name} is shorter than its header says "
                              "(changed since the reader opened it)")
        return len(misses)

    def _read_cached(self, items, shift: int, size: int | None) -> list[int] | None:
        """Pass 1 of :meth:`_read`: the indices of the ranges not cached, each advised as soon as there are
        two; None where RWF_NOWAIT is unsupported (plain reads from now on)."""
        misses: list[int] = []
        try:
            for i, item in enumerate(items):
                try:
                    if osio.read_nowait(self._fd(item[0]), item[2], item[1] + shift) == \
                            (size if size is not None else item[3]):
                        continue
                except BlockingIOError:
                    pass
                misses.append(i)
                if len(misses) == 2:
                    self._advise(items[misses[0]], shift, size)
                if len(misses) >= 2:
                    self._advise(item, shift, size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False
            return None
        return misses

    def _advise(self, item, shift: int, size: int | None) -> None:
        osio.advise(self._fd(item[0]), item[1] + shift, size if size is not None else item[3], "WILLNEED")

    def _read_mapped(self, name: str, items, shift: int, size: int) -> int:
        """Copy rows out of the memory maps while they are cached, ``_CHUNK_ROWS`` per ``process_vm_readv``;
        the index of the first row not read (``len(items)`` when all were), stopping after a chunk slow enough
        to have waited for the disk, and at a row the kernel could not copy (a file cut short in place: the
        preadv that reads it next names it)."""
        clock = time.perf_counter
        if clock() - self._sizes_checked > _SIZE_CHECK_SECONDS:  # a file cut short in place: an error, not zeros
            if self._a_mapped_file_was_cut():
                return 0
            self._sizes_checked = clock()
        local, remote_base = self._row_iovecs(name, items)
        mapped = len(remote_base)
        if not mapped:
            return 0
        remote = torch.empty((mapped, 2), dtype=torch.int64)
        remote[:, 0] = remote_base + shift
        remote[:, 1] = size
        pid, copy = os.getpid(), self._mapping.copy
        for start in range(0, mapped, _CHUNK_ROWS):
            n = min(_CHUNK_ROWS, mapped - start)
            t0 = clock()
            got = copy(pid, local.data_ptr() + 16 * start, n, remote.data_ptr() + 16 * start, n, 0)
            if got != n * size:
                if got < 0 and ctypes.get_errno() in (errno.EPERM, errno.ENOSYS):  # refused here (seccomp): no maps
                    self._mapping = None
                return start + max(got, 0) // size
            if clock() - t0 > _CHUNK_SECONDS:
                return start + n
        return mapped

    def _row_iovecs(self, name: str, items) -> tuple[torch.Tensor, torch.Tensor]:
        """For trajectory buffers ``items``: ``(local, remote)`` where ``local`` is an ``(S, 2)`` iovec array of
        the result's rows (address, length) and ``remote`` the row-0 addresses of the leading mapped items."""
        cached = self._iovecs.get(name)
        if cached is None:
            rows = [ctypes.addressof((ctypes.c_char * len(item[2][0])).from_buffer(item[2][0])) for item in items]
            local = torch.tensor([[addr, len(item[2][0])] for addr, item in zip(rows, items)], dtype=torch.int64)
            bases = []
            for number, base, _ in items:
                m = self._maps.get(number)
                if m is None or m.addr is None:
                    break
                bases.append(m.addr + base)
            cached = self._iovecs[name] = (local, torch.tensor(bases, dtype=torch.int64))
        return cached

    def _a_mapped_file_was_cut(self) -> bool:
        """A mapped file truncated in place (same inode, now shorter than its mapping). A file replaced by
        rename is not: the mapping keeps the old one whole."""
        for number, m in self._maps.items():
            fd = self._fds.get(number)
            try:
                st = os.fstat(fd) if fd is not None else os.stat(self._paths[number])
            except OSError:  # removed: the mapping keeps it
                continue
            if (st.st_dev, st.st_ino) == self._idents[number][:2] and st.st_size < len(m):
                return True
        return False

    # --- the reads -----------------------------------------------------------------------------
    def load(self, step: int, name: str = "unembedding") -> torch.Tensor:
        """W (or E) at optimizer step ``step``, shape ``(V, D)``, in the stored dtype."""
        if not self.steps:
            raise KeyError(self._no_snapshots())
        index = self._index(name)
        try:
            number, base = index[self.steps.index(step)]
        except ValueError:
            raise KeyError(f"no snapshot at step {step}; steps run from {self.steps[:1]} to {self.steps[-1:]}") from None
        buf = bytearray(self.matrix_bytes)
        with self._lock:
            self._read([(number, base, (memoryview(buf),))], 0, self.matrix_bytes)
        return self._tensor(buf, self.shape)

    def trajectory(self, token_id: int, name: str = "unembedding") -> torch.Tensor:
        """Row ``token_id`` (an int, numpy integer or 0-d integer tensor) at every step, ``(len(steps), D)``;
        reads only those rows."""
        token, index, rb = self._token(token_id), self._index(name), self.row_bytes
        with self._lock:
            if name not in self._buffers:  # one reused buffer with a ready-made slice per step
                buf = bytearray(len(index) * rb)
                mv = memoryview(buf)
                self._buffers[name] = (buf, [(number, base, (mv[i * rb:(i + 1) * rb],)) for i, (number, base) in
                                             enumerate(index)])
            buf, items = self._buffers[name]
            done = self._read_mapped(name, items, token * rb, rb) if self._warm.get(name) and self._mapping else 0
            if done < len(items):
                self._warm[name] = self._read(items[done:], token * rb, rb) == 0
            out = bytearray(buf)
        return self._tensor(out, (len(index), self.hidden_dim))

    def rows(self, token_ids, name: str = "unembedding", gap_bytes: int = 4096,
             chunk_bytes: int = 64 << 20) -> torch.Tensor:
        """Rows of several tokens at every step, ``(len(token_ids), len(steps), D)``; ``token_ids``: a 1-D
        integer tensor or array, or a sequence of ints."""
        tokens = self._tokens(token_ids)
        index, S, D, rb = self._index(name), len(self.steps), self.hidden_dim, self.row_bytes
        uniq = sorted(set(tokens))
        with self._lock:
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
        iov_max = osio.iov_max()
        segments: list[list[int]] = []  # runs of positions in uniq read by one preadv
        for p, t in enumerate(uniq):
            if segments and (t - uniq[segments[-1][-1]] - 1) * rb <= gap_bytes and 2 * len(segments[-1]) + 1 <= iov_max:
                segments[-1].append(p)
            else:
                segments.append([p])
        widest = max([(uniq[g[k + 1]] - uniq[g[k]] - 1) * rb for g in segments for k in range(len(g) - 1)] or [0])
        scratch, mv = memoryview(bytearray(max(widest, 1))), memoryview(out)
        items = []
        for s, (number, base) in enumerate(index):  # step by step: one file at a time
            for seg in segments:
                first = uniq[seg[0]]
                buffers = []
                for k, p in enumerate(seg):
                    gap = (uniq[p] - uniq[seg[k - 1]] - 1) * rb if k else 0
                    if gap:
                        buffers.append(scratch[:gap])
                    o = (p * S + s) * rb
                    buffers.append(mv[o:o + rb])
                items.append((number, base + first * rb, tuple(buffers), (uniq[seg[-1]] - first + 1) * rb))
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
            self._read([(number, base, (mv[j * mb:(j + 1) * mb],), mb) for j, (number, base) in
                        enumerate(index[s0:s0 + n])], 0)
            res[:, s0:s0 + n] = whole[:n].index_select(1, picked).transpose(0, 1)
        return res
