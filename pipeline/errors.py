"""Domain exceptions of the data pipeline, in one place so tests can match their text.

Every message starts with the offending path, URL or key. ``SampleError`` is the one that
sharding turns into a rejects row (its ``reason`` is the row's text) and training skips and counts.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of the pipeline's own errors."""


class SampleError(PipelineError):
    """One input cannot become a sample; the job records it and goes on.

    ``where`` is the source path/URL or sample key, ``reason`` a short stable phrase (it is also
    the group key of the rejects summary, so keep details out of it and in ``detail``).
    """

    def __init__(self, where: str, reason: str, detail: str = "") -> None:
        self.where = where
        self.reason = reason
        self.detail = detail
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))


class FormatError(PipelineError):
    """Bytes that do not follow our format (pyramid, shard, dataset.json): corrupt or hostile."""


class DatasetError(PipelineError):
    """A dataset root or layout that cannot be read at all (missing folder, bad mapping file)."""
