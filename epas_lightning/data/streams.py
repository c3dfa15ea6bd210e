"""The bytes of an input file: decompressed by its suffix (``.gz``, ``.zst``), or one byte range of a plain file."""

from __future__ import annotations

import gzip
import io


def compression(path: str) -> str | None:
    """``gz``, ``zst`` or ``None``, by the file's suffix (in any case)."""
    name = path.lower()
    return "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else None


def open_binary(path: str, start: int = 0, stop: int | None = None) -> io.BufferedIOBase:
    """The bytes of ``path``, decompressed; of a plain file, those from ``start`` up to ``stop`` (``None``: the end).

    Reading ``.zst`` needs zstandard (an ``ImportError`` without it).
    """
    kind = compression(path)
    if kind == "gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if kind == "zst":
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # its reader alone cannot be read by lines
    if start == 0 and stop is None:
        return open(path, "rb")  # noqa: SIM115
    return io.BufferedReader(_ByteRange(path, start, stop))


class _ByteRange(io.RawIOBase):
    """The bytes of a file from ``start`` up to ``stop``."""

    def __init__(self, path: str, start: int, stop: int | None) -> None:
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115
        self._file.seek(start)
        self._left = None if stop is None else max(0, stop - start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001
        view = memoryview(buffer).cast("B")
        n = self._file.readinto(view if self._left is None else view[: self._left]) or 0
        if self._left is not None:
            self._left -= n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()
