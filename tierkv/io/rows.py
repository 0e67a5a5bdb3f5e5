"""The token embedding left in the store: a step reads only the rows of the tokens it embeds.

Why this module exists: a step embeds B*T tokens, so it needs B*T rows of the (V, H) table, not
the table (32000 x 2048 bf16 = 125 MiB for a 1B model, 2 GiB for a Llama-3-70B). When layers
stream, device memory is what decides how many of them stay, so a streaming source leaves an
embedding no head reuses in the store's data file and maps it (private, read-only in effect,
random access advised): a lookup faults in the pages of its rows only, from the page cache or
the disk, and the kernel reclaims them like any file cache under memory pressure. On CUDA the
rows are gathered on the host and copied (``model.embed``). Which models qualify is
``lookup_embedding_bytes`` (one rule for the planner and the source).
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

import torch

from tierkv.quantspec import EMBED_WEIGHT

if TYPE_CHECKING:
    from tierkv.io.store import Extent, WeightStore


def lookup_embedding_bytes(extents: "list[Extent]", tied: bool) -> int:
    """Padded bytes of the embedding extent a streaming source may leave in the store, or 0: it must be
    one plain 16-bit table (a GGUF file's quantized codes stay resident) that no LM head reuses (the model
    is untied, or its store packs the head as an extent of its own)."""
    by_name = {e.name: e for e in extents}
    embed = by_name.get("embed")
    if embed is None or (tied and "head" not in by_name):
        return 0
    if list(embed.tensors) != [EMBED_WEIGHT] or embed.tensors[EMBED_WEIGHT].quant is not None:
        return 0
    return embed.padded_nbytes


class MappedEmbedding:
    """The store's embedding extent mapped from its data file: ``table`` is the (V, H) weight, whose
    rows are read from the file when a lookup first touches them. ``verify`` checks the extent's
    CRCs once, a block at a time (each block's pages dropped from this process after its check)."""

    def __init__(self, store: "WeightStore", verify: bool = True) -> None:
        extent = store.extents["embed"]
        assert lookup_embedding_bytes(list(store.extents.values()), store.config.tie_word_embeddings) > 0
        entry = extent.tensors[EMBED_WEIGHT]
        with open(store.data_path, "rb") as f:           # the mapping keeps the file open
            self._map = mmap.mmap(f.fileno(), extent.padded_nbytes, access=mmap.ACCESS_COPY, offset=extent.offset)
            self._advise(getattr(mmap, "MADV_RANDOM", None))  # a row is 1-2 pages: no read-ahead around it
            if verify:
                self._verify(store, extent)
                if hasattr(os, "posix_fadvise"):         # the check read it all: leave the page cache as it was
                    os.posix_fadvise(f.fileno(), extent.offset, extent.padded_nbytes, os.POSIX_FADV_DONTNEED)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)[entry.offset:entry.offset + entry.nbytes]
        self.table = raw.view(getattr(torch, entry.dtype)).view(entry.shape)        # (V, H)
        self.nbytes = extent.padded_nbytes

    def _verify(self, store: "WeightStore", extent: "Extent") -> None:
        check, block, view = store.verifier("embed"), store.crc_block_bytes, memoryview(self._map)
        try:
            for lo in range(0, extent.nbytes, block):
                hi = min(lo + block, extent.nbytes)
                check(lo, view[lo:hi])
                self._advise(getattr(mmap, "MADV_DONTNEED", None), lo, hi - lo)
        finally:
            view.release()

    def _advise(self, flag: int | None, start: int = 0, length: int = 0) -> None:
        if flag is not None and hasattr(self._map, "madvise"):
            self._map.madvise(flag, start, length or len(self._map) - start)

    def close(self) -> None:
        """Drop this object's hold on the mapping; it is unmapped when the last tensor viewing the table
        goes (``torch.frombuffer`` keeps the map alive but not exported, so closing it here under a live
        view would unmap memory still in use)."""
        self.table = torch.empty(0)
        del self._map


__all__ = ["MappedEmbedding", "lookup_embedding_bytes"]
