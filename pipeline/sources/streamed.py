"""Open one file-per-image record as bands when it is too big to decode in memory (folder, slides).

The header is probed (no pixels decoded); an image of at most ``stream_pixels`` pixels returns
None so the caller decodes it in memory as before. A plain tiled TIFF is read tile row by tile row
with tifffile (``tiff_bands``: a third of libvips' memory, same pixels); anything else by libvips.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import SampleError
from pipeline.sources.base import SourceRecord
from pipeline.streamed_sample import StreamedSample, file_sha256, local_file
from pipeline.streaming import VipsBands
from pipeline.tiff_bands import TiffTileBands


def open_streamed(record: SourceRecord, channels: int, max_pixels: int, stream_pixels: int,
                  storage_options: dict[str, Any] | None = None) -> StreamedSample | None:
    """A ``StreamedSample`` over ``record.source`` (tifffile or libvips bands), or None to decode in memory.

    None also when libvips cannot read the header or the image exceeds ``max_pixels``: ``load``
    then rejects it with the same reasons (zero bytes, truncated, decompression bomb) as any image.

    Raises:
        SampleError: a missing or unreadable remote file (while copying it).
    """
    path, sha, cleanup = local_file(record.source, storage_options, hash_local=False)
    closers = [cleanup]  # run last to first by StreamedSample.close
    try:
        try:
            bands: Any = TiffTileBands.open(path, channels, record.source, max_pixels) \
                or VipsBands.open(path, channels, record.source, max_pixels)
        except SampleError:
            bands = None
        if hasattr(bands, "close"):
            closers.append(bands.close)
        if bands is None or bands.width * bands.height <= stream_pixels:
            StreamedSample(bands, {}, "", closers).close()
            return None
        sha = sha or file_sha256(path)
    except BaseException:
        StreamedSample(None, {}, "", closers).close()  # type: ignore[arg-type]
        raise
    meta = {**record.meta, "label": record.label, "label_name": record.label_name,
            "width": bands.width, "height": bands.height, "streamed": True}
    return StreamedSample(bands, meta, sha, closers)
