"""A reusable host buffer laid out as one snapshot file: ``[8-byte length | header | data]``.

The buffer is page-aligned (2 MiB pages where it is large, see :func:`.diskio.aligned_empty`), so
the writer sends the whole file to the disk with O_DIRECT straight from it: the capture writes the
header for the snapshot's step and copies W (and E) into typed views of the data region, and no
other copy is ever made. The header's length depends on the step's digits, so the data region
moves by a few bytes between uses; the views are made anew for each snapshot.
"""

from __future__ import annotations

import torch

from .diskio import aligned_empty
from .format import SnapshotLayout, encode_header, image_bytes

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FileImage:
    """One snapshot file's image in an aligned buffer (one snapshot: ``(V, D)`` per name)."""

    def __init__(self, layout: SnapshotLayout, pin_memory: bool = False) -> None:
        self.layout = layout
        self.buffer = aligned_empty(image_bytes(layout), pin_memory=pin_memory)
        self.header = b""
        self.tensors: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def prepare(self, step: int, every: int) -> dict[str, torch.Tensor]:
        """Write the header of the file holding the snapshot of ``step``; return the views to copy W (and E)
        into, by name, in file order."""
        layout = self.layout
        single = SnapshotLayout(layout.vocab_size, layout.hidden_dim, layout.dtype, 1, layout.include_embedding,
                                layout.tied)
        header = encode_header(single.tensors(1), single.metadata(step, 1, every))
        self.buffer[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        self.header = header
        offset, n = len(header), layout.matrix_bytes
        self.tensors = {}
        for name in sorted(layout.names):
            view = self.buffer[offset: offset + n].view(_TORCH[layout.dtype])
            self.tensors[name] = view.view(layout.vocab_size, layout.hidden_dim)
            offset += n
        return self.tensors
