"""diskio: aligned host buffers; a snapshot file is ``header + tensor bytes`` exactly, written with O_DIRECT
(straight from an aligned image, or through the bounce buffer) or buffered where O_DIRECT is refused, and
renamed into place only when complete; group commit. Real files on this disk, a real tmpfs and a real ramfs
(which refuses O_DIRECT); full disks are real full tmpfs mounts."""

import contextlib
import errno
import mmap
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from budget_callback.snapshots.diskio import (ALIGN, BOUNCE_BYTES, HUGE, GroupCommit, aligned_empty, temporary_path,
                                              write_snapshot_file)
from budget_callback.snapshots.format import SnapshotLayout, encode_header, is_temporary, snapshot_name
from budget_callback.snapshots.image import FileImage
from helpers import tmpfs

pytestmark = pytest.mark.usefixtures("io_platform")  # linux, macos, windows: see conftest.py


def _first_v(D: int, dtype: str, fits) -> int:
    return next(v for v in range(1, 100_000) if fits(SnapshotLayout(v, D, dtype).file_bytes(7, 1, 1)))


SMALL = SnapshotLayout(10, 8, "bfloat16")  # the whole file is under one 4096 B block
MID = SnapshotLayout(1000, 24, "float32")  # 96 kB of data: aligned blocks and a partial last block
PAIR = SnapshotLayout(700, 12, "bfloat16", include_embedding=True)  # W and E, two tensors
EXACT = SnapshotLayout(_first_v(1, "bfloat16", lambda n: n % ALIGN == 0), 1, "bfloat16")  # no partial block
BIG = SnapshotLayout(2400, 1024, "float32")  # 9.8 MB: more than the 8 MiB bounce buffer
assert EXACT.file_bytes(7, 1, 1) % ALIGN == 0 and BIG.step_bytes > BOUNCE_BYTES


# --------------------------------------------------------------------------- helpers

def _raw(t: torch.Tensor) -> bytes:
    """The row-major bytes of ``t`` (what a safetensors file holds for it)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _image(layout: SnapshotLayout, step: int = 7, seed: int = 0):
    """A real FileImage filled with random matrices: (header, tensors in file order, the image)."""
    image = FileImage(layout)
    g = torch.Generator().manual_seed(seed)
    for view in image.prepare(step, 1).values():
        view.copy_(torch.randn(view.shape, generator=g))
    return image.header, list(image.tensors.values()), image


def _loose(layout: SnapshotLayout, step: int = 7, seed: int = 1, transposed: bool = False):
    """The same file's contents as separate tensors that are not one aligned image (the last one transposed:
    not contiguous). Returns (header, tensors in file order)."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, layout.dtype)
    tensors = [torch.randn(layout.vocab_size, layout.hidden_dim, generator=g).to(dtype) for _ in layout.names]
    if transposed:
        tensors[-1] = torch.randn(layout.hidden_dim, layout.vocab_size, generator=g).to(dtype).t()
        assert not tensors[-1].is_contiguous()
    return encode_header(layout.tensors(1), layout.metadata(step, 1, 1)), tensors


def _total(header: bytes, tensors) -> int:
    return len(header) + sum(t.numel() * t.element_size() for t in tensors)


def _check_file(path: Path, header: bytes, tensors, layout: SnapshotLayout, step: int) -> None:
    """The file is exactly ``header + tensor bytes`` and safetensors loads every tensor and the metadata."""
    assert path.read_bytes() == header + b"".join(_raw(t) for t in tensors)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == layout.metadata(step, 1, 1)
        assert sorted(f.keys()) == sorted(layout.names)
        for name, t in zip(sorted(layout.names), tensors):
            assert torch.equal(f.get_tensor(name), t)


def _temporaries(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if is_temporary(n))


def _accepts_o_direct(directory: Path) -> bool | None:
    """Whether this file system takes an aligned O_DIRECT write, asked directly (not through diskio); None where
    the platform has no O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        return None
    probe = directory / "o_direct_probe"
    block = mmap.mmap(-1, ALIGN)  # anonymous mappings are page-aligned
    fd = -1
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        os.write(fd, block)
        return True
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        probe.unlink(missing_ok=True)  # a refused O_DIRECT open may still have created the file (ramfs)


@contextlib.contextmanager
def _ramfs(path: Path):
    """A real ramfs (no size limit; refuses O_DIRECT); skips with the reason where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here ({proc.stderr.strip() or 'mount refused'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(params=["disk", "tmpfs", "ramfs"])
def fs(request, tmp_path):
    """A directory on this machine's disk, on a real tmpfs, or on a real ramfs."""
    if request.param == "disk":
        yield tmp_path
    elif request.param == "tmpfs":
        with tmpfs(tmp_path / "tmpfs", "64m") as d:
            yield d
    else:
        with _ramfs(tmp_path / "ramfs") as d:
            yield d


def _expect_method(info, directory_accepts_direct: bool | None, total: int, direct_method: str) -> None:
    """The reported method is the one the file system allowed: O_DIRECT for every whole 4096 B block where it
    is accepted, the buffered fallback (with its reason) where it is refused, plain buffered writes where the
    platform has no O_DIRECT."""
    if directory_accepts_direct is None:
        assert (info.method, info.fallback, info.direct_bytes) == ("buffered", None, 0)
    elif not directory_accepts_direct:
        assert info.fallback == "open O_DIRECT: EINVAL"
        assert info.method == "buffered (fallback: open O_DIRECT: EINVAL)"
        assert info.direct_bytes == 0
    elif total >= ALIGN:
        assert (info.method, info.fallback) == (direct_method, None)
        assert info.direct_bytes == total - total % ALIGN  # the partial last block goes buffered
    else:
        assert (info.method, info.fallback, info.direct_bytes) == ("buffered (under one 4096 B block)", None, 0)


# --------------------------------------------------------------------------- aligned_empty

@pytest.mark.parametrize("nbytes, align, expected", [
    (0, 4096, 4096), (1, 4096, 4096), (4095, 4096, 4096), (4096, 4096, 4096), (4097, 4096, 8192),
    (100_001, 512, 100_352), (10_000, 65_536, 65_536), (HUGE + 1, 4096, HUGE + 4096),
])
def test_aligned_empty_is_rounded_up_and_aligned(nbytes, align, expected):
    buf = aligned_empty(nbytes, align=align)
    assert buf.dtype == torch.uint8 and buf.is_contiguous()
    assert buf.numel() == expected
    assert buf.data_ptr() % align == 0


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1: text.index("]")]


def _thp_eligible(address: int) -> str | None:
    """``THPeligible`` of the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "THPeligible:":
                return line.split()[1]
    return None


@pytest.mark.parametrize("huge", [None, True])
def test_large_buffers_are_huge_page_aligned_and_advised(huge, io_platform):
    """2 MiB and more (or ``huge=True``): 2 MiB-aligned, the mapping advised MADV_HUGEPAGE. Whether the kernel
    backs it with huge pages is its choice; which mappings are eligible is not. Without MADV_HUGEPAGE the mapping
    is not advised; without anonymous maps (Windows) the buffer is a torch tensor aligned to a page."""
    buf = aligned_empty(5 << 20, huge=huge)
    assert buf.numel() == 5 << 20
    if io_platform == "windows":
        assert buf.data_ptr() % ALIGN == 0
        return
    assert buf.data_ptr() % HUGE == 0
    if _thp_mode() == "madvise":  # only MADV_HUGEPAGE makes a mapping eligible: tells ours from a plain one
        assert _thp_eligible(buf.data_ptr()) == ("1" if io_platform == "linux" else "0")
        assert _thp_eligible(aligned_empty(5 << 20, huge=False).data_ptr()) == "0"


# --------------------------------------------------------------------------- write_snapshot_file

@pytest.mark.parametrize("layout", [SMALL, MID, PAIR, EXACT], ids=["small", "mid", "pair", "exact"])
def test_an_aligned_image_is_written_exactly_from_its_buffer(fs, layout):
    direct_ok = _accepts_o_direct(fs)
    header, tensors, _ = _image(layout)
    path = fs / snapshot_name(7)
    info = write_snapshot_file(path, header, tensors)
    _check_file(path, header, tensors, layout, 7)
    total = _total(header, tensors)
    assert info.nbytes == total == os.path.getsize(path) and info.path == str(path)
    _expect_method(info, direct_ok, total, "direct")
    assert os.listdir(fs) == [path.name]  # the temporary was renamed, nothing else left


@pytest.mark.parametrize("case", ["loose pair, one transposed", "larger than the bounce buffer",
                                  "image views under another step's header", "small"])
def test_tensors_that_are_not_one_aligned_image_go_through_the_bounce_buffer(fs, case):
    direct_ok = _accepts_o_direct(fs)
    if case == "loose pair, one transposed":
        layout, step = PAIR, 7
        header, tensors = _loose(layout, transposed=True)
    elif case == "larger than the bounce buffer":
        layout, step = BIG, 7
        header, tensors = _loose(layout)
    elif case == "small":
        layout, step = SMALL, 7
        header, tensors = _loose(layout)
    else:  # the buffer holds step 7's header; the file must hold step 8's (same length, other bytes)
        layout, step = MID, 8
        _, tensors, image = _image(layout, step=7)
        header = encode_header(layout.tensors(1), layout.metadata(8, 1, 1))
        assert len(header) == len(image.header) and header != image.header
    path = fs / snapshot_name(step)
    info = write_snapshot_file(path, header, tensors)
    _check_file(path, header, tensors, layout, step)
    total = _total(header, tensors)
    assert info.nbytes == total == os.path.getsize(path)
    _expect_method(info, direct_ok, total, "direct+bounce")
    assert os.listdir(fs) == [path.name]


@pytest.mark.parametrize("source", ["image", "loose"])
def test_direct_false_writes_buffered(tmp_path, source):
    header, tensors, *_ = _image(MID) if source == "image" else _loose(MID)
    path = tmp_path / snapshot_name(7)
    info = write_snapshot_file(path, header, tensors, direct=False)
    _check_file(path, header, tensors, MID, 7)
    assert (info.method, info.fallback, info.direct_bytes) == ("buffered", None, 0)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("source", ["image", "loose"])
def test_fsync_false_still_writes_complete_files(tmp_path, direct, source):
    header, tensors, *_ = _image(MID) if source == "image" else _loose(MID, transposed=True)
    path = tmp_path / snapshot_name(7)
    info = write_snapshot_file(path, header, tensors, fsync=False, direct=direct)
    _check_file(path, header, tensors, MID, 7)
    assert info.nbytes == os.path.getsize(path)
    assert os.listdir(tmp_path) == [path.name]


def test_rename_false_leaves_the_complete_temporary_and_no_final_name(tmp_path):
    header, tensors, _ = _image(MID)
    path = tmp_path / snapshot_name(7)
    info = write_snapshot_file(path, header, tensors, rename=False)
    tmp = temporary_path(path)
    assert tmp.parent == tmp_path and tmp.name == f".{path.name}.tmp-{os.getpid()}" and is_temporary(tmp.name)
    assert info.tmp == str(tmp) and not path.exists() and os.listdir(tmp_path) == [tmp.name]
    assert tmp.read_bytes() == header + b"".join(_raw(t) for t in tensors)


def test_a_new_file_replaces_the_old_one_whole(tmp_path):
    path = tmp_path / "same.safetensors"
    old_header, old, *_ = _loose(MID, seed=5)
    write_snapshot_file(path, old_header, old)
    header, tensors, _ = _image(MID, seed=6)
    write_snapshot_file(path, header, tensors)
    _check_file(path, header, tensors, MID, 7)
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("source, kwargs", [
    ("image", {}), ("loose", {}), ("image", {"direct": False}), ("loose", {"fsync": False}),
    ("image", {"fsync": False, "direct": False}),
], ids=["direct", "bounce", "buffered", "bounce-no-fsync", "buffered-no-fsync"])
def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, source, kwargs):
    """ENOSPC for real (a 1 MiB tmpfs, a 2.4 MB file): the write raises, the file of that name is still the old
    complete one, no temporary is left and the space the temporary took is given back."""
    big = SnapshotLayout(1000, 600, "float32")
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / snapshot_name(7)
        old_header, old, *_ = _loose(SMALL, seed=3)
        write_snapshot_file(path, old_header, old)
        free = os.statvfs(disk).f_bfree
        header, tensors, *_ = _image(big) if source == "image" else _loose(big)
        with pytest.raises(OSError) as err:
            write_snapshot_file(path, header, tensors, **kwargs)
        assert err.value.errno == errno.ENOSPC
        assert os.listdir(disk) == [path.name]
        _check_file(path, old_header, old, SMALL, 7)
        assert os.statvfs(disk).f_bfree == free


def test_a_tensor_not_on_the_cpu_is_refused_and_leaves_nothing(tmp_path):
    header = encode_header(MID.tensors(1), MID.metadata(7, 1, 1))
    path = tmp_path / snapshot_name(7)
    with pytest.raises(ValueError, match="on the CPU"):
        write_snapshot_file(path, header, [torch.empty(MID.vocab_size, MID.hidden_dim, device="meta")])
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- GroupCommit

def _add_three(group: GroupCommit, directory: Path, steps=(1, 2, 3)):
    files = {}
    for i, step in enumerate(steps):
        header = encode_header(PAIR.tensors(1), PAIR.metadata(step, 1, 1))
        _, tensors = _loose(PAIR, step=step, seed=10 + i)
        group.add(directory / snapshot_name(step), header, tensors)
        files[directory / snapshot_name(step)] = (header, tensors, step)
    return files


@pytest.mark.parametrize("fsync, fsyncs", [(True, 4), (False, 0)])
def test_group_files_are_invisible_until_commit_then_all_visible(tmp_path, fsync, fsyncs):
    group = GroupCommit(tmp_path, fsync=fsync)
    files = _add_three(group, tmp_path)
    temporaries = sorted(temporary_path(p).name for p in files)
    assert sorted(os.listdir(tmp_path)) == temporaries  # only the complete temporaries
    for path, (header, tensors, _) in files.items():
        assert temporary_path(path).read_bytes() == header + b"".join(_raw(t) for t in tensors)
    expected = sum(_total(h, t) for h, t, _ in files.values())
    assert len(group) == 3 and group.bytes == expected == sum(os.path.getsize(tmp_path / n) for n in temporaries)

    info = group.commit()
    assert (info.files, info.nbytes, info.fsyncs) == (3, expected, fsyncs)  # N file fsyncs + 1 directory fsync
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in files)
    for path, (header, tensors, step) in files.items():
        _check_file(path, header, tensors, PAIR, step)
    assert len(group) == 0 and group.bytes == 0


def test_an_empty_commit_does_nothing(tmp_path):
    info = GroupCommit(tmp_path).commit()
    assert (info.files, info.nbytes, info.fsyncs) == (0, 0, 0) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("fsync, visible", [(True, []), (False, [1])])
def test_a_commit_missing_a_temporary_raises_and_leaves_no_temporary(tmp_path, fsync, visible):
    """The second file's temporary vanished: commit raises; every temporary is removed; what is visible is
    complete (with fsync the failure comes before any rename; without, the first file was already renamed)."""
    group = GroupCommit(tmp_path, fsync=fsync)
    files = _add_three(group, tmp_path)
    temporary_path(tmp_path / snapshot_name(2)).unlink()
    with pytest.raises(FileNotFoundError):
        group.commit()
    assert _temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [snapshot_name(s) for s in visible]
    for path, (header, tensors, step) in files.items():
        if path.exists():
            _check_file(path, header, tensors, PAIR, step)
    assert len(group) == 0 and group.bytes == 0


def test_a_commit_whose_rename_fails_raises_and_leaves_no_temporary(tmp_path):
    """A real rename failure: the second file's final name is a non-empty directory."""
    (tmp_path / snapshot_name(2)).mkdir()
    (tmp_path / snapshot_name(2) / "keep").write_text("x")
    group = GroupCommit(tmp_path)
    files = _add_three(group, tmp_path)
    with pytest.raises(OSError):
        group.commit()
    assert _temporaries(tmp_path) == []
    header, tensors, step = files[tmp_path / snapshot_name(1)]
    _check_file(tmp_path / snapshot_name(1), header, tensors, PAIR, step)  # renamed before the failure: complete
    assert not (tmp_path / snapshot_name(3)).exists()


def test_a_full_disk_fails_the_add_and_the_rest_of_the_batch_commits(tmp_path):
    """ENOSPC for real: on a full tmpfs the error comes from ``add()`` (the temporary is written there), which
    leaves no temporary of its own; the files added before it still commit complete."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        group = GroupCommit(disk)
        files = _add_three(group, disk, steps=(1, 2))
        big = SnapshotLayout(1000, 600, "float32")
        header, tensors = _loose(big, step=9)
        with pytest.raises(OSError) as err:
            group.add(disk / snapshot_name(9), header, tensors)
        assert err.value.errno == errno.ENOSPC
        assert sorted(os.listdir(disk)) == sorted(temporary_path(p).name for p in files)
        assert len(group) == 2 and group.bytes == sum(_total(h, t) for h, t, _ in files.values())
        group.commit()
        assert sorted(os.listdir(disk)) == sorted(p.name for p in files)
        for path, (header, tensors, step) in files.items():
            _check_file(path, header, tensors, PAIR, step)


def test_abort_removes_the_temporaries(tmp_path):
    group = GroupCommit(tmp_path)
    _add_three(group, tmp_path)
    group.abort()
    assert os.listdir(tmp_path) == [] and len(group) == 0 and group.bytes == 0
