"""Read a snapshot directory at the disk's speed: ``SnapshotReader(dir).trajectory(token_id)``.

Opening reads the headers of every file once (one open, ``lseek`` and read each, checked against the file sizes;
a series' headers after the first of a kind compared byte for byte, see :func:`.directory.scan`). Nothing else
happens at open: no file is kept open or mapped, no per-step index is made, so opening a long series costs about
what reading its headers costs and adds no resident memory. The index (for every step and name, a file and the
byte offset of that step's ``(V, D)`` matrix) is made by the first read of a name; no header is parsed again:

* ``trajectory(token)`` -> ``(S, D)``: rows copied out of the files mapped in memory while they are
  in the page cache, by ``process_vm_readv`` (one system call for up to 128 rows, not one per row),
  else one ``preadv`` per step into a reused buffer;
* ``rows(tokens)`` -> ``(T, S, D)``, by a cost model (see ``_ROW_COST_BYTES``), whichever costs less for those
  tokens: the runs of rows (mapped: up to 128 rows per system call; else one ``preadv`` per run of tokens within
  ``gap_bytes``, scattering their rows into the result), or whole matrices (one ``preadv`` each, a few MiB of
  steps at a time), their rows gathered while they are in the CPU's cache into a block of steps that is then
  written into the result a token's run at a time;
* ``load(step)`` -> ``(V, D)``: one read into the result.

Files are opened and mapped as reads first need them (mapping a file is a system call and adds
nothing resident). A file opened for the first time must be the one whose header was read (the same size and the
same header bytes, read again); from then on, the same device, inode, size and mtime: one replaced or rewritten
since is an error naming it. A mapped page counts in the process's resident memory (RSS) once a read has
copied from it, and the kernel maps pages around it too (on recent kernels a whole large folio
of the page cache: up to whole files): after trajectories over a cached series, RSS may show up to
the series' size. Those pages are the page cache's, clean and shared, reclaimed under memory
pressure like any cached file; the reader holds no copy of them.

Cold data: the first pass reads with ``RWF_NOWAIT`` (cached rows cost one syscall each, the
others fail fast); the missing rows are requested with ``posix_fadvise(WILLNEED)`` as they are
found, so the disk serves them in parallel, and read in the second pass. A read that found
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
``min(16,384, soft RLIMIT_NOFILE // 4)`` files (128 where the limit cannot be read) are open at once (the
first ones opened, and one slot the others take turns in: a longer series opens each of those again,
~5 us, once per read pass) and at most ``min(16,384, vm.max_map_count // 4)`` files are mapped (the first ones; later files are read
with ``preadv``). The mappings are made with libc's ``mmap`` and outlive the file descriptor
(``mmap.mmap`` keeps a duplicate descriptor per mapping before Python 3.13), so a warm trajectory of
a long series needs no open file. The process's limits are never changed.
"""

from __future__ import annotations

import contextlib
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
# rows(): a cost model in bytes of a whole-matrix read of cached data taking as long (~10 GB/s here). Reading a run
# of rows by itself costs _ROW_COST_BYTES more than its bytes (a preadv or a mapped copy: ~1.5-2 us), and each row
# after the first in a run _RUN_ROW_BYTES (its buffer: ~0.4 us); gathering one row out of a whole matrix read and
# writing it into the result costs _GATHER_ROW_BYTES (~35-50 ns). rows() reads the runs one by one or whole
# matrices, whichever the model says costs less for those tokens.
_ROW_COST_BYTES = 16 << 10
_RUN_ROW_BYTES = 4 << 10
_GATHER_ROW_BYTES = 512
_GATHER_BYTES = 4 << 20  # whole matrices read per pass: they are still in the CPU's cache when gathered
_STAGE_BYTES = 2 << 20  # gathered rows of up to _STAGE_STEPS steps, written into the result a token at a time
_STAGE_STEPS = 64
_CALL_ELEMENTS = 32_000  # elements per gather or copy call: torch runs a call under 32,768 on the calling thread
_PREFAULT_BYTES = 16 << 20  # a rows() result this large has its pages faulted in by another thread (see _prefaulted)
_PREFAULT_CHUNK = 4 << 20
_SIZE_CHECK_SECONDS = 1.0  # how often mapped reads check that no file was cut short in place
_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_MAX_OPEN_FILES = 16_384  # files open at once, at most (and a quarter of the soft RLIMIT_NOFILE)
_MAX_OPEN_FILES_NO_RLIMIT = 128  # where the limit cannot be read (Windows: the C runtime allows 512 by default)
_MAX_MAPS = 16_384  # files mapped at once, at most (and a quarter of vm.max_map_count)
_DEFAULT_MAX_MAP_COUNT = 65_530  # Linux's vm.max_map_count where /proc does not say


def open_files_bound() -> int:
    """How many snapshot files a reader keeps open: well under the soft RLIMIT_NOFILE, never changing it."""
    resource = osio.module("resource")
    if resource is None:  # Windows: the C runtime's limit (512 by default) is well above this bound
        return _MAX_OPEN_FILES_NO_RLIMIT
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


def _mapping_calls() -> _MappingCalls | None:
    """libc's ``mmap``, ``munmap`` and ``process_vm_readv`` (``madvise`` where it exists); None where any of the
    three is missing (macOS, Windows) or iovecs are not two 64-bit words: rows are read with ``preadv`` then."""
    vp, size_t = ctypes.c_void_p, ctypes.c_size_t
    do_mmap = osio.libc_function("mmap", vp, (vp, size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long))
    do_munmap = osio.libc_function("munmap", ctypes.c_int, (vp, size_t))
    copy = osio.libc_function("process_vm_readv", ctypes.c_ssize_t,
                              (ctypes.c_int, vp, ctypes.c_ulong, vp, ctypes.c_ulong, ctypes.c_ulong))
    if None in (do_mmap, do_munmap, copy) or ctypes.sizeof(vp) != 8 or not hasattr(mmap, "MAP_SHARED"):
        return None
    return _MappingCalls(do_mmap, do_munmap, copy, osio.libc_function("madvise", ctypes.c_int, (vp, size_t, ctypes.c_int)))


_MAP_FAILED = ctypes.c_void_p(-1).value


class _Mapping:
    """A whole file mapped read-only, holding no file descriptor. Its bytes are read only by the kernel
    (``process_vm_readv``), never touched by this process, so a file cut short under it cannot SIGBUS. Nothing
    is made resident when it is mapped: a page is, once a read copies from it."""

    def __init__(self, fd: int, size: int, calls: _MappingCalls) -> None:
        self.calls = calls
        addr = calls.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            raise osio.libc_error("mmap")
        self.addr, self.size = addr, size
        if calls.madvise is not None and hasattr(mmap, "MADV_RANDOM"):
            calls.madvise(addr, size, mmap.MADV_RANDOM)  # a fault reads its page, not a window

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


def _writable(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes, for ``preadv`` (no copy, no numpy)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B") if n else memoryview(bytearray())


@contextlib.contextmanager
def _prefaulted(t: torch.Tensor):
    """While the body runs, another thread faults in the pages of the fresh tensor ``t``, a few MiB at a time
    (``MADV_POPULATE_WRITE``: a ctypes call, which releases the GIL), so that a core the reads leave idle takes
    the page faults the result's first writes would take (~0.6 ms per MiB here: 170 ms of a 256 MiB result).
    Pages the body reaches first it faults in itself, as it would anyway; where the call does not exist,
    nothing happens. The thread is done before the body's result is handed on."""
    nbytes = t.numel() * t.element_size()
    if nbytes < _PREFAULT_BYTES:
        yield
        return
    stop = threading.Event()
    page = mmap.PAGESIZE
    start, end = -(-t.data_ptr() // page) * page, (t.data_ptr() + nbytes) // page * page

    def fault_in() -> None:
        for at in range(start, end, _PREFAULT_CHUNK):
            if stop.is_set() or not osio.populate_write(at, min(_PREFAULT_CHUNK, end - at)):
                return

    thread = threading.Thread(target=fault_in, name="budget-callback-prefault", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class _Index(NamedTuple):
    """Where a name's matrices are, by position in ``steps``."""

    items: list[tuple[int, int]]  # (file number, byte offset of the matrix)
    numbers: torch.Tensor  # the file numbers, (S,) int64
    offsets: torch.Tensor  # the offsets, (S,) int64


class SnapshotReader:
    """Snapshots written by :class:`~budget_callback.BudgetCallback`, in either file layout.

    ``steps`` lists the optimizer steps that have a snapshot; ``load(step)`` returns W ``(V, D)`` in
    the stored dtype; ``trajectory(token_id)`` returns that token's row at every step
    ``(len(steps), D)`` and ``rows(token_ids)`` several tokens' ``(T, len(steps), D)``, reading only
    those rows (or, for many tokens, whole matrices, where that is faster). A stray, foreign or truncated
    file never hides the valid snapshots: it is left out, named in a warning and in ``bad_files``. Token ids
    may be ints, numpy integers or integer tensors. Opening reads the headers only; files are opened and
    mapped as reads need them, a bounded number (see the module's notes); threads sharing a reader take
    turns. Close it (or use ``with``) to release its open files and mappings.
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
        files = found.files
        shapes = {(tuple(t["unembedding"]["shape"][-2:]), t["unembedding"]["dtype"])
                  for t in {id(f.tensors): f.tensors for f in files}.values()}
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
        self._files = files  # file number -> its header's facts (path, steps, offsets, which file it was)
        self._paths = [f.location for f in files]  # file number -> path
        self._idents: dict[int, tuple] = {}  # file number -> (dev, inode, size, mtime) when first opened
        self._fds: dict[int, int] = {}  # file number -> fd: the first files opened, and the spare slot
        self._spare: int | None = None  # the file in the spare slot (closed when another needs it)
        self._maps: dict[int, _Mapping] = {}  # file number -> the file mapped read-only
        self._closed = False
        self._warm: dict[str, bool] = {}  # name -> the last read found every row cached
        steps = [s for f in files for s in f.steps]
        self._in_file_order = all(a < b for a, b in zip(steps, steps[1:]))  # else: files overlap, the last one wins
        self.steps: list[int] = steps if self._in_file_order else sorted(set(steps))
        self._position: dict[int, int] | None = None  # step -> position in ``steps``, made by the first load
        self._indexes: dict[str, _Index] = {}
        self._buffers: dict[str, tuple] = {}
        self._split: dict[str, tuple] = {}  # name -> (maps then, mapped positions, their addresses, the others)
        self._iovecs: dict[str, tuple] = {}  # name -> (mapped positions, the trajectory buffer's rows there)
        self._sizes_checked = float("-inf")

    def _fd(self, number: int) -> int:
        """File ``number``'s descriptor, opened if it is not open.

        The first ``max_fds - 1`` files opened stay open; the others take turns in one spare slot, and each of
        them is mapped when first opened (up to ``max_maps``), so that a warm read needs no descriptor for it.
        Every read visits the files in step order, so this keeps that many hits per pass where a least recently
        used cache of fewer files than the series would evict each file just before it is needed again."""
        fd = self._fds.get(number)
        if fd is not None:
            return fd
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        fd = os.open(self._paths[number], osio.open_flags(os.O_RDONLY))
        keep = len(self._fds) - (self._spare is not None) < self._max_fds - 1
        try:
            size = self._same_file(number, fd)
            if not keep and size and number not in self._maps and len(self._maps) < self._max_maps:
                self._map(number, fd, size)
        except BaseException:
            os.close(fd)
            raise
        if not keep:
            if self._spare is not None:
                os.close(self._fds.pop(self._spare))
            self._spare = number
        self._fds[number] = fd
        return fd

    def _same_file(self, number: int, fd: int) -> int:
        """Refuse any file but the one whose header was read: at its first opening, the same size and the same
        header bytes (read again); later, the same device, inode, size and mtime as then. Returns its size."""
        st, f = os.fstat(fd), self._files[number]
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        known = self._idents.get(number)
        if known is None:
            same = st.st_size == f.size and osio.read_at(fd, len(f.header), 0) == f.header
            if same:
                self._idents[number] = ident
        else:
            same = ident == known
        if not same:
            raise OSError(f"snapshot file {f.name} was replaced or rewritten since the reader opened it; open a new "
                          "SnapshotReader")
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
        self._indexes = {}
        self._buffers, self._iovecs, self._split = {}, {}, {}

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
    def _index(self, name: str) -> _Index:
        """Where ``name``'s matrices are, by position in ``steps`` (made once per name)."""
        index = self._indexes.get(name)
        if index is not None:
            return index
        if name not in NAMES:
            raise ValueError(f"`name` must be one of {', '.join(NAMES)}, got {name!r}")
        stored = name
        if name == "embedding" and not any("embedding" in t for t in {id(f.tensors): f.tensors for f in self._files}
                                           .values()):
            if not self.manifest.get("tied"):
                raise KeyError("no embedding stored: train with BudgetCallback(include_embedding=True)")
            stored = "unembedding"  # tied: E is W, stored once
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        items = self._items(stored)
        pairs = torch.tensor(items, dtype=torch.int64).view(-1, 2)
        index = self._indexes[name] = _Index(items, pairs[:, 0].contiguous(), pairs[:, 1].contiguous())
        return index

    def _items(self, name: str) -> list[tuple[int, int]]:
        """``(file number, byte offset of the matrix)`` of tensor ``name`` for every step, in ``steps``' order: made
        from the headers' facts when first needed (not at opening), one look-up per distinct tensors' header."""
        mb, starts, items = self.matrix_bytes, {}, []
        for number, f in enumerate(self._files):
            start = starts.get(id(f.tensors))
            if start is None:
                info = f.tensors.get(name)
                start = starts[id(f.tensors)] = int(info["data_offsets"][0]) if info is not None else -1
            if start < 0:
                raise KeyError(f"snapshot file {f.name} holds no {name!r} tensor: the series was written with "
                               "different settings")
            start += f.data_start
            if len(f.steps) == 1:
                items.append((number, start))
            else:
                items.extend((number, start + j * mb) for j in range(len(f.steps)))
        if self._in_file_order:
            return items
        where = dict(zip((s for f in self._files for s in f.steps), items))  # a step in two files: the last
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
        """For each ``(file number, base, buffers[, nbytes])`` of the iterable ``items``: read at ``base + shift``
        into ``buffers`` (``size`` bytes, else ``nbytes``).

        Pass 1 reads with RWF_NOWAIT: cached ranges are copied, the others fail fast and, from the second
        on, are asked of the kernel at once (``posix_fadvise(WILLNEED)``). Pass 2 reads them. (Two passes,
        not three: a file that is no longer open is opened again once per pass.) Returns how many ranges
        were not cached.
        """
        if self._nowait:
            misses = self._read_cached(iter(items), shift, size)
        else:  # no RWF_NOWAIT: every range is a miss
            misses = list(items)
            for item in misses if len(misses) > 1 else ():
                self._advise(item, shift, size)
        for item in misses:
            number, base, buffers = item[:3]
            want = size if size is not None else item[3]
            if osio.read_into(self._fd(number), buffers, base + shift) != want:
                raise OSError(f"snapshot file {os.path.basename(self._paths[number])} is shorter than its header "
                              "says (changed since the reader opened it)")
        return len(misses)

    def _read_cached(self, items, shift: int, size: int | None) -> list:
        """Pass 1 of :meth:`_read`: the items not cached, each advised as soon as there are two (where RWF_NOWAIT
        turns out to be unsupported, plain reads from then on: the rest are all misses, unadvised)."""
        misses: list = []
        fds, preadv, nowait = self._fds, os.preadv, os.RWF_NOWAIT
        for item in items:
            number = item[0]
            fd = fds.get(number)
            try:
                if preadv(fd if fd is not None else self._fd(number), item[2], item[1] + shift, nowait) == \
                        (size if size is not None else item[3]):
                    continue
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False
                misses.append(item)
                misses.extend(items)
                return misses
            misses.append(item)
            if len(misses) == 2:
                self._advise(misses[0], shift, size)
            if len(misses) >= 2:
                self._advise(item, shift, size)
        return misses

    def _advise(self, item, shift: int, size: int | None) -> None:
        osio.advise(self._fd(item[0]), item[1] + shift, size if size is not None else item[3], "WILLNEED")

    def _mapped(self, name: str, index: _Index) -> tuple[list[int], torch.Tensor, list[int]]:
        """``(positions, bases, others)``: the positions in ``steps`` whose files are mapped, their matrices'
        addresses ``(M,)`` int64, and the other positions (made again when more files have been mapped)."""
        cached = self._split.get(name)
        if cached is None or cached[0] != len(self._maps):
            maps, positions, bases, others = self._maps, [], [], []
            for i, (number, base) in enumerate(index.items):
                m = maps.get(number)
                if m is None or m.addr is None:
                    others.append(i)
                else:
                    positions.append(i)
                    bases.append(m.addr + base)
            cached = self._split[name] = (len(maps), positions, torch.tensor(bases, dtype=torch.int64), others)
        return cached[1], cached[2], cached[3]

    def _copy_mapped(self, local: torch.Tensor, remote: torch.Tensor, size: int) -> int:
        """Copy the rows ``remote`` -> ``local`` (``(n, 2)`` iovec arrays, ``size`` bytes each) out of the maps,
        ``_CHUNK_ROWS`` per ``process_vm_readv``; the number copied (all of them, or up to a chunk slow enough to
        have waited for the disk, or up to a row the kernel could not copy: a file cut short in place, which
        the preadv that reads it next names)."""
        n_rows = len(remote)
        if not n_rows:
            return 0
        clock = time.perf_counter
        if clock() - self._sizes_checked > _SIZE_CHECK_SECONDS:  # a file cut short in place: an error, not zeros
            if self._a_mapped_file_was_cut():
                return 0
            self._sizes_checked = clock()
        pid, copy = os.getpid(), self._mapping.copy
        lp, rp = local.data_ptr(), remote.data_ptr()
        for start in range(0, n_rows, _CHUNK_ROWS):
            n = min(_CHUNK_ROWS, n_rows - start)
            t0 = clock()
            got = copy(pid, lp + 16 * start, n, rp + 16 * start, n, 0)
            if got != n * size:
                if got < 0 and ctypes.get_errno() in (errno.EPERM, errno.ENOSYS):  # refused here (seccomp): no maps
                    self._mapping = None
                return start + max(got, 0) // size
            if clock() - t0 > _CHUNK_SECONDS:
                return start + n
        return n_rows

    def _trajectory_mapped(self, name: str, index: _Index, items, shift: int, size: int) -> list:
        """Trajectory rows of the mapped files out of the maps; the items left to read with preadv."""
        positions, bases, others = self._mapped(name, index)
        if not positions:
            return items
        local = self._row_iovecs(name, items, positions)
        remote = torch.empty((len(positions), 2), dtype=torch.int64)
        remote[:, 0] = bases + shift
        remote[:, 1] = size
        done = self._copy_mapped(local, remote, size)
        return [items[i] for i in (sorted(others + positions[done:]) if done < len(positions) else others)]

    def _row_iovecs(self, name: str, items, positions: list[int]) -> torch.Tensor:
        """The ``(M, 2)`` iovec array (address, length) of the trajectory buffer's rows at ``positions``."""
        cached = self._iovecs.get(name)
        if cached is None or cached[0] is not positions:
            rows = [items[i][2][0] for i in positions]
            addrs = [ctypes.addressof((ctypes.c_char * len(row)).from_buffer(row)) for row in rows]
            local = torch.tensor([[addr, len(row)] for addr, row in zip(addrs, rows)], dtype=torch.int64)
            cached = self._iovecs[name] = (positions, local.view(-1, 2))
        return cached[1]

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
        if self._position is None:
            self._position = {s: i for i, s in enumerate(self.steps)}
        position = self._position.get(step) if isinstance(step, int) and not isinstance(step, bool) else None
        if position is None:
            raise KeyError(f"no snapshot at step {step}; steps run from {self.steps[:1]} to {self.steps[-1:]}")
        number, base = index.items[position]
        out = torch.empty(self.shape, dtype=self.dtype)
        with self._lock:
            self._read([(number, base, (_writable(out),))], 0, self.matrix_bytes)
        return out

    def trajectory(self, token_id: int, name: str = "unembedding") -> torch.Tensor:
        """Row ``token_id`` (an int, numpy integer or 0-d integer tensor) at every step, ``(len(steps), D)``;
        reads only those rows."""
        token, index, rb = self._token(token_id), self._index(name), self.row_bytes
        with self._lock:
            if name not in self._buffers:  # one reused buffer with a ready-made slice per step
                buf = bytearray(len(index.items) * rb)
                mv = memoryview(buf)
                self._buffers[name] = (buf, [(number, base, (mv[i * rb:(i + 1) * rb],)) for i, (number, base) in
                                             enumerate(index.items)])
            buf, items = self._buffers[name]
            rest = items
            if self._maps and self._warm.get(name) and self._mapping is not None:
                rest = self._trajectory_mapped(name, index, items, token * rb, rb)
            if rest:
                self._warm[name] = self._read(rest, token * rb, rb) == 0
            out = bytearray(buf)
        return self._tensor(out, (len(items), self.hidden_dim))

    def rows(self, token_ids, name: str = "unembedding", gap_bytes: int = 4096,
             chunk_bytes: int = _GATHER_BYTES) -> torch.Tensor:
        """Rows of several tokens at every step, ``(len(token_ids), len(steps), D)``; ``token_ids``: a 1-D
        integer tensor or array, or a sequence of ints. Per step, either the tokens' rows are read (tokens within
        ``gap_bytes`` of each other by one read), or the whole matrix is read (``chunk_bytes`` of matrices at a
        time) and the rows gathered from it: whichever costs less for these tokens (see ``_ROW_COST_BYTES``).
        Either way the rows go straight to their places in the result, in the order asked (a token asked twice
        is read once)."""
        tokens = self._tokens(token_ids)
        index, S, D = self._index(name), len(self.steps), self.hidden_dim
        res = torch.empty((len(tokens), S, D), dtype=self.dtype)
        if not tokens or not S:
            return res
        first: dict[int, int] = {}  # token -> the first row of the result that holds it
        for i, t in enumerate(tokens):
            first.setdefault(t, i)
        uniq = sorted(first)
        segments = self._segments(uniq, gap_bytes)
        with self._lock, _prefaulted(res):
            if self._dense_costs_less(uniq, segments):
                self._rows_dense(index, tokens, res, chunk_bytes)
                return res
            at = [first[t] for t in uniq]  # the result's row of each distinct token, in token order
            positions = range(S)
            if self._maps and self._warm.get(name) and self._mapping is not None:
                positions = self._rows_mapped(name, index, uniq, at, res)
            if positions:
                self._warm[name] = self._rows_sparse(index, uniq, at, segments, res, positions) == 0
            for i, t in enumerate(tokens):
                if first[t] != i:  # asked again: the rows read for its first place
                    res[i].copy_(res[first[t]])
        return res

    def _segments(self, uniq: list[int], gap_bytes: int) -> list[list[int]]:
        """Runs of positions in ``uniq`` read by one ``preadv`` each: tokens within ``gap_bytes`` of each other,
        up to the buffers one call takes."""
        rb, iov_max = self.row_bytes, osio.iov_max()
        segments: list[list[int]] = []
        for p, t in enumerate(uniq):
            if segments and (t - uniq[segments[-1][-1]] - 1) * rb <= gap_bytes and 2 * len(segments[-1]) + 1 <= iov_max:
                segments[-1].append(p)
            else:
                segments.append([p])
        return segments

    def _dense_costs_less(self, uniq: list[int], segments: list[list[int]]) -> bool:
        """Whether reading whole matrices and gathering the rows costs less per step than reading the runs of
        rows, by the cost model (``_ROW_COST_BYTES``, ``_GATHER_ROW_BYTES``)."""
        rb = self.row_bytes
        runs = sum(_ROW_COST_BYTES + (len(g) - 1) * _RUN_ROW_BYTES + (uniq[g[-1]] - uniq[g[0]] + 1) * rb
                   for g in segments)
        return runs >= self.matrix_bytes + len(uniq) * _GATHER_ROW_BYTES

    def _rows_mapped(self, name: str, index: _Index, uniq: list[int], at: list[int],
                     res: torch.Tensor) -> list[int]:
        """The rows of tokens ``uniq`` (into the result's rows ``at``) at the positions whose files are mapped, out
        of the maps, one file after the other; the positions left to read with preadv."""
        positions, bases, others = self._mapped(name, index)
        if not positions:
            return others
        M, U, S, rb = len(positions), len(uniq), res.shape[1], self.row_bytes
        remote = torch.empty((M, U, 2), dtype=torch.int64)
        remote[:, :, 0] = bases[:, None] + torch.tensor(uniq, dtype=torch.int64)[None, :] * rb
        remote[:, :, 1] = rb
        local = torch.empty((M, U, 2), dtype=torch.int64)  # into res (U, S, D)
        local[:, :, 0] = res.data_ptr() + (torch.tensor(at, dtype=torch.int64)[None, :] * S +
                                           torch.tensor(positions, dtype=torch.int64)[:, None]) * rb
        local[:, :, 1] = rb
        done = self._copy_mapped(local.view(-1, 2), remote.view(-1, 2), rb) // U
        return sorted(others + positions[done:]) if done < M else others

    def _rows_sparse(self, index: _Index, uniq: list[int], at: list[int], segments: list[list[int]],
                     res: torch.Tensor, positions) -> int:
        """The rows of tokens ``uniq`` (into the result's rows ``at``) at ``positions``, one ``preadv`` per run of
        ``segments`` (the bytes between its tokens go to a scratch buffer); the number of reads that were not
        cached."""
        S, rb = res.shape[1], self.row_bytes
        widest = max([(uniq[g[k + 1]] - uniq[g[k]] - 1) * rb for g in segments for k in range(len(g) - 1)] or [0])
        scratch, mv, stride = memoryview(bytearray(max(widest, 1))), _writable(res), S * rb
        singles = [(uniq[g[0]] * rb, at[g[0]] * stride) for g in segments if len(g) == 1]
        groups = [(uniq[g[0]] * rb, [(at[g[0]] * stride, 0)] + [(at[p] * stride, (uniq[p] - uniq[q] - 1) * rb)
                                                                for q, p in zip(g, g[1:])],
                   (uniq[g[-1]] - uniq[g[0]] + 1) * rb)
                  for g in segments if len(g) > 1]
        where = index.items

        def items():  # step by step: one file at a time
            for s in positions:
                number, base = where[s]
                at = s * rb
                for lead, o in singles:
                    o += at
                    yield number, base + lead, (mv[o:o + rb],), rb
                for lead, parts, span in groups:
                    buffers = []
                    for o, gap in parts:
                        if gap:
                            buffers.append(scratch[:gap])
                        o += at
                        buffers.append(mv[o:o + rb])
                    yield number, base + lead, buffers, span
        return self._read(items(), 0)

    def _rows_dense(self, index: _Index, tokens: list[int], res: torch.Tensor, chunk_bytes: int) -> None:
        """Whole matrices, ``chunk_bytes`` of them at a time (one ``preadv`` each); their rows gathered while they
        are in the CPU's cache into a block of steps, and the block written into ``res`` a few tokens at a time,
        each token's rows of the block one contiguous run: the ``(T, S, D)`` result is written in runs, not row by
        row at a stride of ``S * D`` (3-4x less per row). Rows move as 8-byte elements where they can, and every
        gather and copy call moves under ``_CALL_ELEMENTS``, so that torch keeps it on the calling thread
        (splitting it across threads costs more than such a copy when other work keeps the cores busy) at a few
        calls per chunk of steps. ``tokens`` in the result's order, as asked (repeats gathered again)."""
        S, (V, D), mb, U = res.shape[1], self.shape, self.matrix_bytes, len(tokens)
        C = max(1, min(S, chunk_bytes // max(mb, 1)))  # matrices read per pass
        B = C * max(1, min(S, _STAGE_STEPS, _STAGE_BYTES // max(U * self.row_bytes, 1)) // C)  # steps per block
        whole, stage = torch.empty((C, V, D), dtype=self.dtype), torch.empty((B, U, D), dtype=self.dtype)
        wide = torch.int64 if self.row_bytes % 8 == 0 else self.dtype  # 8 bytes per element: fewer, same bytes
        out, staged, matrices = res.view(wide), stage.view(wide), whole.view(wide)
        W = staged.shape[2]  # elements per row
        picked = torch.tensor(tokens, dtype=torch.long)
        if C * U * W <= _CALL_ELEMENTS:  # a pass's rows in one call
            gathers = None
        else:
            per_gather = max(1, _CALL_ELEMENTS // W)
            gathers = [(picked[a:a + per_gather], a, min(U, a + per_gather)) for a in range(0, U, per_gather)]
        per_copy = max(1, _CALL_ELEMENTS // (B * W))  # tokens per copy call
        mv = _writable(whole)
        items = [(number, base, (mv[(j % C) * mb:(j % C + 1) * mb],), mb)
                 for j, (number, base) in enumerate(index.items)]
        first = filled = 0  # the block: steps first .. first + filled
        for s0 in range(0, S, C):
            n = min(C, S - s0)
            self._read(items[s0:s0 + n], 0)
            if gathers is None:
                torch.index_select(matrices[:n], 1, picked, out=staged[filled:filled + n])
            else:
                for j in range(n):
                    matrix, staged_step = matrices[j], staged[filled + j]
                    for rows, a, b in gathers:
                        torch.index_select(matrix, 0, rows, out=staged_step[a:b])
            filled += n
            if filled == B or s0 + n == S:
                for a in range(0, U, per_copy):
                    out[a:a + per_copy, first:first + filled].copy_(staged[:filled, a:a + per_copy].transpose(0, 1))
                first, filled = first + filled, 0
