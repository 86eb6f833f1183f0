"""Generic image folders, for users' own (possibly gigapixel) data: one folder per class.

Layouts:

- ``root/{split}/{class}/{image}`` when every top-level folder is a split name
  (``train``, ``val``, ``validation``, ``valid``, ``test``);
- otherwise ``root/{class}/{image}``, everything being split ``train``.

``layout="split"`` or ``"flat"`` forces one (e.g. for a class literally named ``test``). Images
sit directly in their class folder; files elsewhere (at the root, or nested deeper) are rejects
("unexpected location"), so nothing disappears silently. Extensions jpg/jpeg/png/tif/tiff/bmp/webp
count as images in any case; any other file is a reject "unreadable image" and so is an image
file whose bytes do not decode. Classes are the sorted class-folder names over all splits, so
indices agree between splits. ``channels`` is 3 (RGB) or 1 (grayscale).

Gigapixel inputs: an image whose header declares more than ``stream_pixels`` pixels (default
100 MP, a 10k x 10k image; 0 = never) is not decoded in memory but handed to the sharder as bands
(``load_stream``, libvips: tiled/striped TIFF and BigTIFF, pyramidal TIFF, huge JPEG/PNG), and its
pyramid is built streaming. ``max_pixels`` still applies: raise it for gigapixel data. Remote
files are only considered for streaming from ``STREAM_PROBE_BYTES`` up (they are copied locally
to be probed); smaller ones decode in memory as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

from pipeline.errors import DatasetError
from pipeline.sources.base import LoadedSample, Reject, SourceRecord
from pipeline.sources.listing import (
    DEFAULT_MAX_PIXELS,
    KeyGuard,
    Listing,
    has_image_extension,
    list_files,
    load_image_file,
    sanitize_key,
)
from pipeline.sources.streamed import open_streamed
from pipeline.streamed_sample import StreamedSample

STREAM_PROBE_BYTES = 32 << 20  # remote files smaller than this always decode in memory
DEFAULT_STREAM_PIXELS = 100_000_000
SPLIT_NAMES = ("train", "val", "validation", "valid", "test")
LAYOUTS = ("auto", "split", "flat")


class ImageFolder:
    """Reader for ``{class}/{image}`` trees (layouts in the module docstring)."""

    name = "folder"

    def __init__(
        self,
        root: str,
        *,
        channels: int = 3,
        layout: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        storage_options: dict[str, Any] | None = None,
        stream_pixels: int = DEFAULT_STREAM_PIXELS,
    ) -> None:
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"folder.channels={channels!r}: must be 1 or 3")
        if layout not in LAYOUTS:
            raise ValueError(f"folder.layout={layout!r}: must be one of {list(LAYOUTS)}")
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"folder.max_pixels={max_pixels!r}: must be a positive integer")
        if isinstance(stream_pixels, bool) or not isinstance(stream_pixels, int) or stream_pixels < 0:
            raise ValueError(f"folder.stream_pixels={stream_pixels!r}: must be an integer >= 0 (0 = never stream)")
        self.stream_pixels = stream_pixels
        self.root = root.rstrip("/")
        self.channels = channels
        self.layout = layout
        self.max_pixels = max_pixels
        self.storage_options = dict(storage_options or {})

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_tree", None)  # listings stay on the driver; workers only need load()
        return state

    @cached_property
    def _tree(self) -> tuple[Listing, bool]:
        """The root's listing and whether it has split folders (read once per instance)."""
        listing = list_files(self.root, self.storage_options)
        if self.layout != "auto":
            return listing, self.layout == "split"
        tops = {rel.split("/")[0] for rel in listing.files if "/" in rel}
        return listing, bool(tops) and tops <= set(SPLIT_NAMES)

    def _place(self, rel: str, has_splits: bool) -> tuple[str, str] | None:
        """``(split, class)`` of a file at a valid place, else None."""
        parts = rel.split("/")
        if has_splits and len(parts) == 3:
            return parts[0], parts[1]
        if not has_splits and len(parts) == 2:
            return "train", parts[0]
        return None

    @property
    def classes(self) -> list[str]:
        """Sorted class-folder names over every split (lists the root on first use)."""
        listing, has_splits = self._tree
        found = {place[1] for rel in listing.files if (place := self._place(rel, has_splits))}
        return sorted(found)

    @property
    def splits(self) -> list[str]:
        """The splits present under the root (what the sharder shards by default)."""
        listing, has_splits = self._tree
        return sorted({place[0] for rel in listing.files if (place := self._place(rel, has_splits))})

    def records(self, splits: list[str]) -> Iterator[SourceRecord | Reject]:
        """Records of ``splits`` in sorted path order; misplaced or non-image files are rejects.

        Raises:
            DatasetError: the root is missing, or a requested split has no folder.
        """
        listing, has_splits = self._tree
        present = self.splits
        for split in splits:
            if split not in present:
                raise DatasetError(f"{self.root}: no split {split!r} (found {present})")
        index = {c: i for i, c in enumerate(self.classes)}
        guard = KeyGuard()
        wanted = set(splits)
        for rel, size in listing.files.items():
            url = listing.url(rel)
            place = self._place(rel, has_splits)
            if place is None:
                top = rel.split("/")[0] if has_splits else "train"
                if top in wanted:
                    yield Reject(url, "unexpected location", top, "expected {class}/{image}")
                continue
            split, cls = place
            if split not in wanted:
                continue
            name = rel.rsplit("/", 1)[-1]
            if not has_image_extension(name):
                yield Reject(url, "unreadable image", split, "not an image file name")
                continue
            yield guard.admit(SourceRecord(
                key=sanitize_key(f"folder-{split}-{cls}-{name}"),
                split=split,
                source=url,
                label=index[cls],
                label_name=cls,
                meta={"path": rel},
                size_hint=size,
            ))

    def load(self, record: SourceRecord) -> LoadedSample:
        """Decode one image to ``channels`` channels.

        Raises:
            SampleError: missing or undecodable file.
        """
        return load_image_file(record, self.channels, self.max_pixels, self.storage_options)

    def load_stream(self, record: SourceRecord) -> StreamedSample | None:
        """Bands of a gigapixel image (more than ``stream_pixels``), else None (use ``load``).

        Raises:
            SampleError: the file is missing or libvips cannot read it, or it exceeds ``max_pixels``.
        """
        if not self.stream_pixels or (record.size_hint < STREAM_PROBE_BYTES and "://" in record.source):
            return None
        return open_streamed(record, self.channels, self.max_pixels, self.stream_pixels, self.storage_options)

    def describe(self) -> dict[str, Any]:
        """Options for dataset.json (``stream_pixels`` only when changed: older datasets stay identical)."""
        out = {
            "root": self.root,
            "channels": self.channels,
            "layout": self.layout,
            "max_pixels": self.max_pixels,
        }
        if self.stream_pixels != DEFAULT_STREAM_PIXELS:
            out["stream_pixels"] = self.stream_pixels
        return out
