"""Bands of a tiled TIFF decoded one tile row at a time with tifffile: memory set by the tile row.

libvips reads a tiled TIFF through a tile cache of a few full tile rows (and region buffers around
each request): about 200 MB of a 32k-wide RGB image with 512-px tiles, 400 MB at 64k, the largest
part of a streaming build's peak (docs/gigapixel.md). Here exactly one tile row is decoded and
kept (50 MB at 32k), and a band inside it is handed over as a view, not a copy. Same pixels as
``streaming.VipsBands`` (both decode with libjpeg-turbo / zlib and convert nothing): tested.

Only the plain case takes this path, checked from the header (``TiffTileBands.open`` returns None
otherwise and the caller uses libvips): page 0 tiled, 8-bit unsigned, interleaved, no extra
samples, as many samples as the channels asked for (grey MinIsBlack, or RGB / JPEG YCbCr), a
compression tifffile decodes, and no empty (sparse) tile.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PLAIN_COMPRESSIONS = (1, 5, 7, 8, 32946, 50000)  # none, LZW, JPEG, deflate (both codes), zstd
MINISBLACK, RGB, YCBCR = 1, 2, 6


def plain_tiled_page(page: Any, channels: int) -> bool:
    """Whether tifffile's ``page`` is one ``TiffTileBands`` reads exactly as libvips would."""
    photometric = int(page.photometric)
    ok_colour = (channels == 1 and photometric == MINISBLACK) or (
        channels == 3 and (photometric == RGB or (photometric == YCBCR and int(page.compression) == 7)))
    return bool(page.is_tiled and page.imagedepth == 1 and page.dtype == np.uint8 and page.bitspersample == 8
                and page.samplesperpixel == channels and not page.extrasamples and int(page.planarconfig) == 1
                and int(page.compression) in PLAIN_COMPRESSIONS and ok_colour and 0 not in page.databytecounts)


class TiffTileBands:
    """``BandSource`` over a plain tiled TIFF (module docstring); ``close()`` releases the file."""

    def __init__(self, tif: Any, where: str) -> None:
        page = tif.pages[0]
        self.tif, self.page, self.where = tif, page, where
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.channels = int(page.samplesperpixel)
        self.source_size = (self.width, self.height)
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self._across = -(-self.width // self.tile_w)
        self._row_index = -1
        self._row: np.ndarray | None = None

    @classmethod
    def open(cls, path: str, channels: int, where: str, max_pixels: int) -> TiffTileBands | None:
        """The bands of ``path``, or None when it is not a plain tiled TIFF (or not a TIFF at all).

        Raises:
            SampleError: "decompression bomb" when the header declares more than ``max_pixels``.
        """
        import tifffile

        from pipeline.errors import SampleError

        try:
            tif = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001 - anything tifffile cannot parse is libvips' to judge
            return None
        try:
            page = tif.pages[0]
            if not isinstance(page, tifffile.TiffPage) or not plain_tiled_page(page, channels):
                tif.close()
                return None
        except Exception:  # noqa: BLE001 - a header tifffile chokes on: let libvips judge it
            tif.close()
            return None
        if page.imagewidth * page.imagelength > max_pixels:
            tif.close()
            raise SampleError(where, "decompression bomb", f"{page.imagewidth}x{page.imagelength} > max_pixels={max_pixels}")
        return cls(tif, where)

    def shrunk(self, max_side: int) -> Any:
        """These bands downscaled like ``VipsBands.shrunk`` (through libvips, which resizes)."""
        from pipeline.streaming import VipsBands

        if max_side <= 0 or max_side >= max(self.width, self.height):
            return self
        return VipsBands.open(self.tif.filehandle.path, self.channels, self.where, self.width * self.height).shrunk(max_side)

    def _tile_row(self, ty: int) -> np.ndarray:
        """Decoded tile row ``ty``: (rows, width[, 3]) uint8, the one kept."""
        from pipeline.errors import SampleError

        if ty == self._row_index and self._row is not None:
            return self._row
        self._row = None  # free the previous row before decoding the next
        rows = min(self.tile_h, self.height - ty * self.tile_h)
        out = np.empty((rows, self.width, self.channels), np.uint8)
        fh, page = self.tif.filehandle, self.page
        for tx in range(self._across):
            index = ty * self._across + tx
            try:
                fh.seek(page.dataoffsets[index])
                data = fh.read(page.databytecounts[index])
                tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
                tile = np.asarray(tile).reshape(np.shape(tile)[-3:])
            except Exception as exc:  # noqa: BLE001 - codec errors vary; the sample is rejected
                text = str(exc).lower()
                reason = "truncated image" if "truncat" in text or "premature" in text else "unreadable image"
                raise SampleError(self.where, reason, f"tile {index} (row {ty}, column {tx}): {str(exc)[:300]}") from None
            x0 = tx * self.tile_w
            w = min(self.tile_w, self.width - x0)
            out[:, x0:x0 + w] = tile[:rows, :w]
        self._row, self._row_index = (out[:, :, 0] if self.channels == 1 else out), ty
        return self._row

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``[y0, y1)``: a view into the decoded tile row when the band lies in one."""
        t0, t1 = y0 // self.tile_h, (y1 - 1) // self.tile_h
        if t0 == t1:
            return self._tile_row(t0)[y0 - t0 * self.tile_h:y1 - t0 * self.tile_h]
        parts = []
        for ty in range(t0, t1 + 1):
            a, b = max(y0, ty * self.tile_h), min(y1, (ty + 1) * self.tile_h)
            parts.append(self._tile_row(ty)[a - ty * self.tile_h:b - ty * self.tile_h].copy())
        return np.concatenate(parts)

    def close(self) -> None:
        self._row = None
        self.tif.close()
