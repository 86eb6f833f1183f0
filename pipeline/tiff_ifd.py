"""A small, hostile-input-safe parser of the IFDs of a tiled TIFF pyramid (classic TIFF and BigTIFF).

Why not tifffile: the lazy reader must know exactly which bytes it fetches (a 2 GB slide is read
by HTTP range requests), must bound every allocation by limits it chooses, and must turn every
malformed file into one error type. This module reads only the header, the IFD entry tables and
the values of the few tags a JPEG-tiled pyramid needs (plus read-ahead, see READAHEAD), through a
``read(offset, size)`` callback; it never decodes tile data.

Levels are found the way GDAL, OpenSlide and libvips find them: IFD 0 is level 0, then every
tiled reduced-resolution image (NewSubfileType bit 0) in the main IFD chain or in IFD 0's
SubIFDs, ordered by decreasing width. Non-tiled or full-resolution extra pages (labels, macro
images of slides) are skipped.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.errors import FormatError

Reader = Callable[[int, int], bytes]

MAX_IFDS = 64  # pages walked in the main chain plus SubIFDs; real pyramids have < 30
MAX_ENTRIES = 512  # tags per IFD; real files have < 40
MAX_TABLES_BYTES = 1 << 16  # JPEGTables: quantisation + Huffman tables are < 1 KiB in practice
MAX_TILE_SIDE = 4096
# Reads of structure fetch at least this much and keep the last chunk: an IFD, its tile offset
# and byte count arrays are usually adjacent (tifffile writes them so), so one request per level
# suffices over HTTP, where requests cost more than bytes.
READAHEAD = 16 << 10

# TIFF field types -> (struct code, size); only integer and byte types are ever read.
_TYPES = {1: ("B", 1), 2: ("B", 1), 3: ("H", 2), 4: ("I", 4), 6: ("b", 1), 7: ("B", 1), 8: ("h", 2),
          9: ("i", 4), 13: ("I", 4), 16: ("Q", 8), 17: ("q", 8), 18: ("Q", 8)}
_WANTED = {254, 256, 257, 258, 259, 262, 277, 284, 322, 323, 324, 325, 330, 347}


@dataclass(frozen=True)
class TiledLevel:
    """One tiled JPEG image of the pyramid: its size, tile side and where each tile's bytes are."""

    width: int
    height: int
    samples: int
    photometric: int
    tile: int
    offsets: Sequence[int]  # per tile, row-major over the tile grid (a tuple, or DeferredInts)
    bytecounts: Sequence[int]
    jpegtables: bytes  # b"" when the tiles are complete JPEG streams

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile)


class DeferredInts(Sequence[int]):
    """A tile offset or byte count array read on first use (``parse_pyramid(defer_index=True)``).

    A 64k x 64k level 0 has 65,536 tiles: 1 MiB of offsets and counts in a BigTIFF. A reader that
    only ever touches the coarse levels (TNet at a fixed geometry on a huge image) need not fetch
    it, which keeps the bytes read per sample flat in the image size.
    """

    def __init__(self, parser: _Parser, entry: _Entry, tag: int, count: int, lock: threading.Lock) -> None:
        self._parser, self._entry, self._tag, self._count, self._lock = parser, entry, tag, count, lock
        self._values: tuple[int, ...] | None = None

    def _load(self) -> tuple[int, ...]:
        if self._values is None:
            with self._lock:  # the parser's read-ahead chunk is shared state
                if self._values is None:
                    self._values = self._parser.values({self._tag: self._entry}, self._tag, self._count)
        return self._values

    @property
    def loaded(self) -> bool:
        return self._values is not None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # type: ignore[override]  # int or slice, as tuple
        return self._load()[index]

    def __iter__(self):
        return iter(self._load())


@dataclass(frozen=True)
class _Entry:
    dtype: int
    count: int
    value_field: bytes  # the inline 4/8 bytes: the value itself or its offset


class _Parser:
    def __init__(self, read: Reader, size: int, where: str) -> None:
        self.read, self.size, self.where = read, size, where
        self._chunk_at, self._chunk = 0, b""
        head = self._read(0, 16 if size >= 16 else 8)
        if head[:2] not in (b"II", b"MM"):
            raise FormatError(f"{where}: not a TIFF file (byte order mark {head[:2]!r})")
        self.bo = "<" if head[:2] == b"II" else ">"
        magic = struct.unpack(self.bo + "H", head[2:4])[0]
        if magic == 42:
            self.big, self.first = False, struct.unpack(self.bo + "I", head[4:8])[0]
        elif magic == 43 and len(head) >= 16:
            if struct.unpack(self.bo + "HH", head[4:8]) != (8, 0):
                raise FormatError(f"{where}: BigTIFF header with unsupported offset size")
            self.big, self.first = True, struct.unpack(self.bo + "Q", head[8:16])[0]
        else:
            raise FormatError(f"{where}: not a TIFF file (magic {magic})")

    def _read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise FormatError(f"{self.where}: TIFF structure points outside the file "
                              f"(offset {offset}, {size} bytes, file {self.size} bytes)")
        start = offset - self._chunk_at
        if start >= 0 and offset + size <= self._chunk_at + len(self._chunk):
            return self._chunk[start:start + size]
        data = self.read(offset, min(max(size, READAHEAD), self.size - offset))
        if len(data) < size:
            raise FormatError(f"{self.where}: short read at offset {offset} ({len(data)} of {size} bytes)")
        self._chunk_at, self._chunk = offset, data
        return data[:size]

    def ifd(self, offset: int) -> tuple[dict[int, _Entry], int]:
        """Entries of the IFD at ``offset`` (wanted tags only) and the next IFD's offset."""
        count_size, entry_size, next_size = (8, 20, 8) if self.big else (2, 12, 4)
        count = struct.unpack(self.bo + ("Q" if self.big else "H"), self._read(offset, count_size))[0]
        if not 0 < count <= MAX_ENTRIES:
            raise FormatError(f"{self.where}: IFD at {offset} has {count} entries (1..{MAX_ENTRIES} allowed)")
        table = self._read(offset + count_size, count * entry_size + next_size)
        entries: dict[int, _Entry] = {}
        head = self.bo + ("HHQ" if self.big else "HHI")
        for i in range(count):
            raw = table[i * entry_size:(i + 1) * entry_size]
            tag, dtype, n = struct.unpack(head, raw[:12 if self.big else 8])
            if tag in _WANTED:
                entries[tag] = _Entry(dtype, n, raw[12:] if self.big else raw[8:])
        nxt = struct.unpack(self.bo + ("Q" if self.big else "I"), table[-next_size:])[0]
        return entries, nxt

    def values(self, entries: dict[int, _Entry], tag: int, max_count: int) -> tuple[int, ...]:
        """Integer values of ``tag`` (empty if absent), refusing more than ``max_count`` of them."""
        entry = entries.get(tag)
        if entry is None:
            return ()
        if entry.dtype not in _TYPES:
            raise FormatError(f"{self.where}: tag {tag} has unsupported type {entry.dtype}")
        code, size = _TYPES[entry.dtype]
        if entry.count > max_count:
            raise FormatError(f"{self.where}: tag {tag} has {entry.count} values (at most {max_count} expected)")
        nbytes = entry.count * size
        if nbytes <= len(entry.value_field):
            data = entry.value_field[:nbytes]
        else:
            offset = struct.unpack(self.bo + ("Q" if self.big else "I"), entry.value_field)[0]
            data = self._read(offset, nbytes)
        return struct.unpack(f"{self.bo}{entry.count}{code}", data)

    def one(self, entries: dict[int, _Entry], tag: int, default: int | None = None) -> int:
        vals = self.values(entries, tag, 16)
        if not vals:
            if default is None:
                raise FormatError(f"{self.where}: required TIFF tag {tag} is missing")
            return default
        return int(vals[0])


def _level(p: _Parser, entries: dict[int, _Entry], max_pixels: int,
           defer: threading.Lock | None = None) -> TiledLevel | None:
    """The tiled image an IFD describes, or None when it is not a tiled image (strips, thumbnails)."""
    if 322 not in entries:
        return None
    where = p.where
    width, height = p.one(entries, 256), p.one(entries, 257)
    tile, tile_h = p.one(entries, 322), p.one(entries, 323)
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise FormatError(f"{where}: image size {width}x{height} outside 1..max_pixels={max_pixels}")
    if tile != tile_h or tile % 16 or not 16 <= tile <= MAX_TILE_SIDE:
        raise FormatError(f"{where}: tiles {tile}x{tile_h} unsupported (square, multiple of 16, <= {MAX_TILE_SIDE})")
    compression, samples = p.one(entries, 259, 1), p.one(entries, 277, 1)
    photometric, planar = p.one(entries, 262, 1), p.one(entries, 284, 1)
    bits = p.values(entries, 258, 16) or (1,)
    if compression != 7 or set(bits) != {8} or (planar != 1 and samples > 1):
        raise FormatError(f"{where}: only 8-bit JPEG-tiled TIFF is supported "
                          f"(compression {compression}, bits {bits}, planar {planar})")
    if (samples, photometric) not in ((1, 1), (3, 2), (3, 6)):
        raise FormatError(f"{where}: unsupported samples/photometric {samples}/{photometric}")
    n_tiles = -(-width // tile) * -(-height // tile)
    if defer is not None:
        for tag in (324, 325):
            entry = entries.get(tag)
            if entry is None or entry.count != n_tiles or entry.dtype not in (3, 4, 13, 16):
                raise FormatError(f"{where}: tag {tag}: {entry.count if entry else 0} values of type "
                                  f"{entry.dtype if entry else '-'} for {n_tiles} tiles")
        offsets: Sequence[int] = DeferredInts(p, entries[324], 324, n_tiles, defer)
        counts: Sequence[int] = DeferredInts(p, entries[325], 325, n_tiles, defer)
    else:
        offsets = p.values(entries, 324, n_tiles)
        counts = p.values(entries, 325, n_tiles)
    if len(offsets) != n_tiles or len(counts) != n_tiles:
        raise FormatError(f"{where}: {len(offsets)} tile offsets and {len(counts)} byte counts "
                          f"for {n_tiles} tiles")
    tables = bytes(p.values(entries, 347, MAX_TABLES_BYTES))
    if defer is None:
        offsets, counts = tuple(offsets), tuple(counts)
    return TiledLevel(width, height, samples, photometric, tile, offsets, counts, tables)


def parse_pyramid(read: Reader, size: int, where: str, max_pixels: int,
                  defer_index: bool = False) -> list[TiledLevel]:
    """Parse the pyramid levels of a JPEG-tiled TIFF of ``size`` bytes read through ``read``.

    ``defer_index=True`` reads each level's tile offsets and byte counts only when a tile of that
    level is first asked for (``DeferredInts``; their counts and types are still checked here).

    Returns the levels by decreasing width, level 0 first. Every count, offset and size is checked
    against the file size and the limits above before anything it points to is read.

    Raises:
        FormatError: not a TIFF, a corrupt structure, IFD loops, sizes over ``max_pixels``, or a
            layout other than 8-bit JPEG tiles with 1 (grey) or 3 (RGB/YCbCr) samples.
    """
    p = _Parser(read, size, where)
    defer = threading.Lock() if defer_index else None
    seen: set[int] = set()
    levels: list[TiledLevel] = []

    def visit(offset: int) -> tuple[dict[int, _Entry], int]:
        if offset in seen or len(seen) >= MAX_IFDS:
            raise FormatError(f"{where}: IFD loop or more than {MAX_IFDS} IFDs (offset {offset})")
        seen.add(offset)
        return p.ifd(offset)

    entries, nxt = visit(p.first)
    first = _level(p, entries, max_pixels, defer)
    if first is None:
        raise FormatError(f"{where}: first image is not tiled")
    levels.append(first)
    for sub in p.values(entries, 330, MAX_IFDS):
        sub_entries, _ = visit(int(sub))
        level = _level(p, sub_entries, max_pixels, defer)
        if level is not None:
            levels.append(level)
    while nxt:
        entries, nxt = visit(nxt)
        if p.one(entries, 254, 0) & 1:
            level = _level(p, entries, max_pixels, defer)
            if level is not None:
                levels.append(level)
    levels.sort(key=lambda lv: -lv.width)
    for a, b in zip(levels, levels[1:]):
        if b.width >= a.width or b.height >= a.height or (b.samples, b.tile) != (a.samples, a.tile):
            raise FormatError(f"{where}: pyramid levels {a.width}x{a.height} and {b.width}x{b.height} "
                              "are not a decreasing series with the same samples and tile")
    return levels
