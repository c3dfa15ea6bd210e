"""The bytes of an input file: decompressed by its suffix (``.gz``, ``.zst``), or one byte range of a plain file.

A compressed file that ends in the middle of its data raises ``EOFError`` after the bytes before the cut, for ``.gz``
(Python's gzip) and ``.zst`` alike: zstandard's own reader ends there quietly, losing the rest unnoticed.
"""

from __future__ import annotations

import gzip
import io

_ZSTD_READ_BYTES = 2**16
"""Compressed bytes decompressed at a time: ordinary text expands some tenfold."""


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
        return io.BufferedReader(_ZstdFrames(path))
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


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` file, frame after frame; ``EOFError`` where the file ends inside one."""

    def __init__(self, path: str) -> None:
        import zstandard

        # zstd's largest window (2 GiB: `zstd --long=31`, or a stream of unknown size): zstandard refuses over 128 MiB
        # unless told; the memory is taken only for a frame that asks for it.
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._file = open(path, "rb")  # noqa: SIM115
        self._frame = None  # the decompressor of the frame being read; None between frames
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001
        while self._pos == len(self._out):
            if not (data := self._file.read(_ZSTD_READ_BYTES)):
                if self._frame is not None:
                    raise EOFError("Compressed file ended before the end of its last frame")
                return 0
            self._out, self._pos = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._pos)
        memoryview(buffer).cast("B")[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            data, self._frame = self._frame.unused_data, None  # the next frame starts there
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()
