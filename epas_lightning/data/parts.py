"""Large input files cut into parts that several workers read: plain JSON Lines at line starts, parquet at row groups.

Each part knows the number of its first line or row, so its records keep the keys (``file#n``) the train/val split
hashes and the names (``file:n``, ``file row n``) a bad one is reported by; read in order, the parts give the file's
documents in order. A compressed file cannot be entered in the middle: it stays whole, as does a file that cannot
be read here (reading it reports why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from epas_lightning.data.sources import InputFile
from epas_lightning.data.streams import compression

_COUNT_BYTES = 8 * 2**20
"""Bytes read at a time to find the line starts of a JSONL file (one pass over it, counting newlines)."""


def cut_into_parts(files: Sequence[InputFile], part_bytes: int) -> list[InputFile]:
    """``files`` with each JSONL (uncompressed) or parquet file larger than ``part_bytes`` cut into parts of about
    that many bytes."""
    part_bytes = max(1, part_bytes)
    cut: list[InputFile] = []
    for f in files:
        if f.n_bytes <= part_bytes or f.start != 0 or f.stop is not None:
            cut.append(f)
        elif f.kind == "jsonl" and compression(f.path) is None:
            cut.extend(_line_parts(f, part_bytes))
        elif f.kind == "parquet":
            cut.extend(_row_group_parts(f, part_bytes))
        else:
            cut.append(f)
    return cut


def _line_parts(f: InputFile, part_bytes: int) -> list[InputFile]:
    """Parts starting at the first line start at or after every ``part_bytes`` bytes from the previous part."""
    starts = [(0, 1)]  # (byte offset, line number) of each part's first line
    size = newlines = 0  # bytes read, newlines before the current block
    wanted = part_bytes  # the next part starts at the first line that starts at or after this offset
    try:
        with open(f.path, "rb") as stream:
            while block := stream.read(_COUNT_BYTES):
                counted = 0
                while (end := block.find(b"\n", max(0, wanted - 1 - size))) != -1:
                    newlines += block.count(b"\n", counted, end + 1)
                    counted = end + 1
                    starts.append((size + end + 1, newlines + 1))
                    wanted = size + end + 1 + part_bytes
                newlines += block.count(b"\n", counted)
                size += len(block)
    except OSError:
        return [f]
    while len(starts) > 1 and starts[-1][0] >= size:  # the file ends with that newline: no line starts there
        starts.pop()
    if len(starts) == 1:
        return [f]
    bounds = [offset for offset, _ in starts[1:]] + [size]
    return [
        replace(f, n_bytes=stop - start, start=start, stop=None if i == len(starts) - 1 else stop, first_record=line)
        for i, ((start, line), stop) in enumerate(zip(starts, bounds, strict=True))
    ]


def _row_group_parts(f: InputFile, part_bytes: int) -> list[InputFile]:
    """Parts of whole row groups, of about ``part_bytes`` of the file each (by the groups' share of its data)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(f.path)
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    except Exception:
        return [f]
    scale = f.n_bytes / max(1, sum(g.total_byte_size for g in groups))
    parts: list[InputFile] = []
    first_group, first_row, row, filled = 0, 1, 1, 0.0
    for i, group in enumerate(groups):
        filled += group.total_byte_size * scale
        row += group.num_rows
        if filled >= part_bytes and i + 1 < len(groups):
            parts.append(replace(f, n_bytes=round(filled), start=first_group, stop=i + 1, first_record=first_row))
            first_group, first_row, filled = i + 1, row, 0.0
    if not parts:
        return [f]
    return [*parts, replace(f, n_bytes=round(filled), start=first_group, stop=None, first_record=first_row)]
